//! Greedy search and multinomial sampling: one row per sequence, one token per step.
//!
//! They differ only in the pick: the highest processed score, or a draw from the warped distribution
//! ([`super::sample`]) with the sequence's own generator, so a seeded sequence draws the same tokens
//! whatever else shares the batch. The pick itself happens for every such sequence of the batch at once
//! ([`super::select`]): a sequence contributes its row and takes its token.

use super::error::Result;
use super::sample::Sampler;
use super::select::Row;
use super::sequence::{Choice, Common, Context};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use shared::TokenLogprob;

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

    /// The row this sequence adds to the step's batch selection ([`super::select`]); a sampling row draws
    /// its uniform from its own generator here, one a step, so a seeded sequence draws the same tokens
    /// whatever else shares the batch.
    pub fn row<'a>(&'a mut self, seq: &'a Common) -> Row<'a> {
        Row {
            history: &seq.tokens,
            generated: seq.generated().len(),
            processors: &seq.processors,
            sample: self.sampler.as_mut().map(|b| {
                let (s, rng) = &mut **b;
                (&*s, rng.random::<f64>())
            }),
            candidates: None,
            mask: seq.grammar.as_ref().and_then(|g| g.mask()),
            logprobs: seq.logprobs,
        }
    }

    /// Takes the token the batch selection picked for this sequence.
    pub fn take(
        &self,
        seq: &mut Common,
        next: i64,
        logprob: Option<TokenLogprob>,
        ctx: &Context<'_>,
    ) -> Result<Choice> {
        if seq.logprobs.is_some()
            && let Some(lp) = logprob
        {
            seq.token_logprobs.push(lp);
        }
        Ok(match seq.push(next, ctx)? {
            Some(done) => Choice::Done(done),
            None => Choice::Feed(vec![next]),
        })
    }
}
