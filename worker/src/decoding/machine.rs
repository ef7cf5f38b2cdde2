//! Each strategy's state machine behind one enum, so the scheduler runs a sequence whatever its strategy.
//!
//! Kept apart from `sequence`, whose types the strategies use, so the strategies depend on the sequence and
//! this enum on the strategies, never the other way round.

use super::beam::Beam;
use super::contrastive::Contrastive;
use super::greedy::Pick;
use super::sample::Sampler;
use shared::{Decoding, GenerationPlan};

/// The strategy's own state.
pub(crate) enum Machine {
    Pick(Pick),
    Contrastive(Contrastive),
    Beam(Beam),
}

impl Machine {
    /// The state machine a plan runs as. transformers runs contrastive search with `top_k` 1 or alpha 0,
    /// and beam search with one beam, as greedy search; the tokens are the same and greedy is cheaper.
    pub fn for_plan(plan: &GenerationPlan, vocab: usize) -> Self {
        match &plan.decoding {
            Decoding::Greedy => Machine::Pick(Pick::greedy()),
            Decoding::Contrastive { penalty_alpha, top_k } if *penalty_alpha > 0.0 && *top_k > 1 => {
                Machine::Contrastive(Contrastive::new(*penalty_alpha, (*top_k).min(vocab).max(1)))
            }
            Decoding::Contrastive { .. } => Machine::Pick(Pick::greedy()),
            Decoding::Sample {
                temperature,
                top_k,
                top_p,
                min_p,
                typical_p,
                seed,
            } => Machine::Pick(Pick::sample(Sampler {
                temperature: *temperature,
                top_k: *top_k,
                top_p: *top_p,
                min_p: *min_p,
                typical_p: *typical_p,
                seed: *seed,
            })),
            Decoding::Beam { num_beams, .. } if *num_beams <= 1 => Machine::Pick(Pick::greedy()),
            Decoding::Beam {
                num_beams,
                length_penalty,
                early_stopping,
            } => Machine::Beam(Beam::new(*num_beams, *length_penalty, *early_stopping)),
        }
    }

    /// Cache rows the sequence occupies.
    pub fn rows(&self) -> usize {
        match self {
            Machine::Beam(b) => b.num_beams(),
            _ => 1,
        }
    }

    /// Tokens each of its rows feeds per step.
    pub fn queries(&self) -> usize {
        match self {
            Machine::Contrastive(c) => c.top_k(),
            _ => 1,
        }
    }

    /// Whether the prefill must return hidden states (contrastive search's context).
    pub fn needs_hidden(&self) -> bool {
        matches!(self, Machine::Contrastive(_))
    }
}
