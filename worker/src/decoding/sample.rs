//! Multinomial sampling: warp the scores (temperature, top-k, top-p, typical-p, in transformers' order),
//! then draw from their softmax.
//!
//! The draw happens on the host with a ChaCha generator per prompt: seeded, the same seed gives the same
//! text on any machine and whatever else shares the batch. (transformers' `torch.multinomial` stream cannot
//! be reproduced outside PyTorch, so seeded texts differ from theirs; the distribution is the same.)

use super::error::Result;
use super::processors;
use super::tensors::to_vec_f32;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct Sampler {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub typical_p: Option<f64>,
    pub seed: Option<u64>,
}

impl Sampler {
    /// A fresh generator: from the seed, or from the OS when there is none.
    pub fn rng(&self) -> ChaCha8Rng {
        match self.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        }
    }

    /// The warpers transformers applies when `do_sample` is set, in its order.
    pub fn warp(&self, scores: &Tensor) -> Result<Tensor> {
        let mut s = if self.temperature != 1.0 {
            processors::temperature(scores, self.temperature)?
        } else {
            scores.shallow_clone()
        };
        if let Some(k) = self.top_k {
            s = processors::top_k(&s, k)?;
        }
        if let Some(p) = self.top_p {
            s = processors::top_p(&s, p)?;
        }
        if let Some(p) = self.typical_p {
            s = processors::typical_p(&s, p)?;
        }
        Ok(s)
    }

    /// Draws one token per row of `scores` (`[rows, vocab]`); row `r` uses `rngs[owners[r]]`.
    pub fn pick(&self, scores: &Tensor, rngs: &mut [ChaCha8Rng], owners: &[usize]) -> Result<Vec<i64>> {
        let probs = self.warp(scores)?.f_softmax(-1, Kind::Float)?;
        let vocab = probs.size().last().copied().unwrap_or(0) as usize;
        let probs = to_vec_f32(&probs)?;
        Ok(probs
            .chunks(vocab.max(1))
            .zip(owners)
            .map(|(row, &owner)| draw(row, &mut rngs[owner]) as i64)
            .collect())
    }
}

/// Index drawn with probability proportional to `probs[i]`; zero-probability entries are never drawn.
pub fn draw(probs: &[f32], rng: &mut impl Rng) -> usize {
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    let target = rng.random::<f64>() * total;
    let mut acc = 0.0;
    let mut last_positive = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            acc += p as f64;
            last_positive = i;
            if acc > target {
                return i;
            }
        }
    }
    last_positive
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sampler(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> Sampler {
        Sampler {
            temperature,
            top_k,
            top_p,
            typical_p: None,
            seed: Some(7),
        }
    }

    fn argmax(v: &[f32]) -> usize {
        let mut best = 0;
        for (i, x) in v.iter().enumerate() {
            if *x > v[best] {
                best = i;
            }
        }
        best
    }

    proptest! {
        #[test]
        fn top_k_of_one_is_greedy(logits in prop::collection::vec(-20.0f32..20.0, 2..64), seed in any::<u64>()) {
            let s = Sampler { seed: Some(seed), ..sampler(1.0, Some(1), None) };
            let t = Tensor::from_slice(&logits).view([1, -1]);
            let mut rngs = vec![s.rng()];
            prop_assert_eq!(s.pick(&t, &mut rngs, &[0]).unwrap(), vec![argmax(&logits) as i64]);
        }

        #[test]
        fn a_tiny_temperature_is_greedy(logits in prop::collection::vec(-20.0f32..20.0, 2..64), seed in any::<u64>()) {
            // A clear winner (ties at 1e-3 temperature would still be a coin toss).
            let mut logits = logits;
            let best = argmax(&logits);
            logits[best] += 1.0;
            let s = Sampler { seed: Some(seed), ..sampler(1e-3, None, None) };
            let t = Tensor::from_slice(&logits).view([1, -1]);
            let mut rngs = vec![s.rng()];
            prop_assert_eq!(s.pick(&t, &mut rngs, &[0]).unwrap(), vec![best as i64]);
        }

        #[test]
        fn top_p_draws_only_from_the_smallest_set_reaching_the_mass(
            logits in prop::collection::vec(-5.0f32..5.0, 2..32), p in 0.05f64..0.95, seed in any::<u64>()
        ) {
            let s = Sampler { seed: Some(seed), ..sampler(1.0, None, Some(p)) };
            let t = Tensor::from_slice(&logits).view([1, -1]);
            let kept = to_vec_f32(&s.warp(&t).unwrap()).unwrap();
            let probs = to_vec_f32(&t.softmax(-1, Kind::Float)).unwrap();
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|a, b| probs[*b].total_cmp(&probs[*a]));
            // The kept set is a prefix of the tokens by probability whose mass reaches p, and dropping its
            // least likely member would fall short of p (up to float rounding).
            let n_kept = kept.iter().filter(|v| v.is_finite()).count();
            prop_assert!(order[..n_kept].iter().all(|&i| kept[i].is_finite()));
            let mass: f64 = order[..n_kept].iter().map(|&i| probs[i] as f64).sum();
            prop_assert!(mass >= p - 1e-5, "mass {mass} < {p}");
            let without_last = mass - probs[order[n_kept - 1]] as f64;
            prop_assert!(without_last < p + 1e-5, "{without_last} already reaches {p}");
            let mut rngs = vec![s.rng()];
            for _ in 0..20 {
                let tok = s.pick(&t, &mut rngs, &[0]).unwrap()[0] as usize;
                prop_assert!(kept[tok].is_finite());
            }
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens_and_another_seed_differs() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.1).collect();
        let t = Tensor::from_slice(&logits).view([1, -1]);
        let run = |seed| {
            let s = Sampler {
                seed: Some(seed),
                ..sampler(1.0, None, None)
            };
            let mut rngs = vec![s.rng()];
            (0..50)
                .map(|_| s.pick(&t, &mut rngs, &[0]).unwrap()[0])
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn draws_follow_the_probabilities() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let probs = [0.0f32, 0.25, 0.75, 0.0];
        let mut counts = [0usize; 4];
        for _ in 0..20_000 {
            counts[draw(&probs, &mut rng)] += 1;
        }
        assert_eq!(counts[0] + counts[3], 0);
        let share = counts[2] as f64 / 20_000.0;
        assert!((share - 0.75).abs() < 0.02, "{share}");
    }
}
