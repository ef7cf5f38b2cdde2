//! Greedy search and multinomial sampling: one row per sequence, one token per step.
//!
//! They differ only in the pick: the highest processed score, or a draw from the warped distribution
//! ([`super::sample`]) with the sequence's own generator, so a seeded sequence draws the same tokens
//! whatever else shares the batch.

use super::error::Result;
use super::sample::Sampler;
use super::sequence::{Choice, Common, Context};
use super::tensors::to_vec_i64;
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

pub(crate) struct Pick {
    sampler: Option<Box<(Sampler, ChaCha8Rng)>>,
}

impl Pick {
    pub fn greedy() -> Self {
        Self { sampler: None }
    }

    pub fn sample(sampler: Sampler) -> Self {
        let rng = sampler.rng();
        Self {
            sampler: Some(Box::new((sampler, rng))),
        }
    }

    /// Whether the pick is a plain argmax of the raw logits (greedy, no logits processor): the scheduler
    /// then takes it from one argmax over the whole batch instead of one per sequence.
    pub fn is_plain_argmax(&self, seq: &Common) -> bool {
        self.sampler.is_none() && seq.processors.is_noop()
    }

    /// Picks the next token from the logits of the last pass (`[1, vocab]`), or takes `argmax`, that
    /// argmax already computed for the whole batch (only for [`Pick::is_plain_argmax`]).
    pub fn choose(
        &mut self,
        seq: &mut Common,
        logits: &Tensor,
        argmax: Option<i64>,
        ctx: &Context<'_>,
    ) -> Result<Choice> {
        if let Some(next) = argmax.filter(|_| self.is_plain_argmax(seq)) {
            return Ok(match seq.push(next, ctx) {
                Some(done) => Choice::Done(done),
                None => Choice::Feed(vec![next]),
            });
        }
        let scores = seq.process(logits.shallow_clone())?;
        let next = match &mut self.sampler {
            None => to_vec_i64(&scores.f_argmax(-1, false)?)?[0],
            Some(b) => {
                let (s, rng) = &mut **b;
                s.pick(&scores, std::slice::from_mut(rng), &[0])?[0]
            }
        };
        Ok(match seq.push(next, ctx) {
            Some(done) => Choice::Done(done),
            None => Choice::Feed(vec![next]),
        })
    }
}
