//! Multinomial sampling: warp the scores (temperature, top-k, top-p, min-p, typical-p, in transformers' order),
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
    pub min_p: Option<f64>,
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
        if let Some(p) = self.min_p {
            s = processors::min_p(&s, p)?;
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
            min_p: None,
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

    /// transformers' `MinPLogitsWarper` (4.55.4) written out on the host in float64: the tokens it keeps.
    fn min_p_reference(logits: &[f32], min_p: f64) -> Vec<bool> {
        let max = logits.iter().copied().fold(f32::MIN, f32::max) as f64;
        let z: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
        let probs: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp() / z).collect();
        let top = probs.iter().copied().fold(0.0, f64::max);
        probs.iter().map(|&p| p >= min_p * top).collect()
    }

    proptest! {
        #[test]
        fn min_p_keeps_the_tokens_at_least_min_p_times_as_likely_as_the_likeliest(
            logits in prop::collection::vec(-6.0f32..6.0, 2..64), min_p in 0.0f64..=1.0,
        ) {
            let t = Tensor::from_slice(&logits).view([1, -1]);
            let kept: Vec<bool> = to_vec_f32(&processors::min_p(&t, min_p).unwrap())
                .unwrap()
                .iter()
                .map(|v| v.is_finite())
                .collect();
            let want = min_p_reference(&logits, min_p);
            let max = logits.iter().copied().fold(f32::MIN, f32::max);
            for (i, (&got, &want)) in kept.iter().zip(&want).enumerate() {
                // A probability within float32 rounding of the threshold may fall either way.
                let ratio = ((logits[i] - max) as f64).exp();
                if (ratio - min_p).abs() > 1e-5 {
                    prop_assert_eq!(got, want, "token {} of {:?} at min_p {}", i, logits, min_p);
                }
            }
            prop_assert!(kept[argmax(&logits)], "the likeliest token always stays");
        }

        #[test]
        fn min_p_of_one_is_greedy(logits in prop::collection::vec(-20.0f32..20.0, 2..64), seed in any::<u64>()) {
            let mut logits = logits;
            let best = argmax(&logits);
            logits[best] += 1.0;
            let s = Sampler { seed: Some(seed), min_p: Some(1.0), ..sampler(1.0, None, None) };
            let t = Tensor::from_slice(&logits).view([1, -1]);
            let mut rngs = vec![s.rng()];
            prop_assert_eq!(s.pick(&t, &mut rngs, &[0]).unwrap(), vec![best as i64]);
        }
    }

    #[test]
    fn min_p_applies_after_temperature_top_k_and_top_p_as_in_transformers() {
        // Probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.2 alone keeps the first three (0.15 >= 0.1)...
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let t = Tensor::from_slice(&logits).view([1, -1]);
        let kept = |s: Sampler| -> Vec<bool> {
            to_vec_f32(&s.warp(&t).unwrap())
                .unwrap()
                .iter()
                .map(|v| v.is_finite())
                .collect()
        };
        let with = |temperature, top_p| Sampler {
            min_p: Some(0.2),
            ..sampler(temperature, None, top_p)
        };
        assert_eq!(kept(with(1.0, None)), [true, true, true, false]);
        // ... at temperature 2 the distribution flattens and all four pass; at 0.5 it sharpens and the
        // third goes (0.15² / 0.5² < 0.2): min-p reads the temperature-scaled probabilities.
        assert_eq!(kept(with(2.0, None)), [true, true, true, true]);
        assert_eq!(kept(with(0.5, None)), [true, true, false, false]);
        // After top-p 0.6 has kept the first two, renormalised (0.625, 0.375), min-p 0.2 keeps both.
        assert_eq!(kept(with(1.0, Some(0.6))), [true, true, false, false]);
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
