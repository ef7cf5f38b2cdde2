//! When a generated sequence is done: EOS, a stop sequence (once `min_new_tokens` are out), or length, and
//! what it leaves behind ([`Decoded`]). Every strategy asks the same question of each continuation it keeps.

use super::stop::{StopChecker, TextDecoder};
use shared::FinishReason;

/// What one sequence produced: its tokens and why it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Generated token ids only, as transformers returns them after the prompt: the EOS token that ended a
    /// sequence is included, and so is the token that completed a stop sequence.
    pub tokens: Vec<i64>,
    pub finish_reason: FinishReason,
    /// The stop sequence that ended the text, when `finish_reason` is `Stop`.
    pub stop: Option<String>,
    /// Each token's log-probability, when the plan asked for them (`logprobs`).
    pub logprobs: Option<Vec<shared::TokenLogprob>>,
}

pub(crate) struct Finish<'a> {
    pub eos: Option<i64>,
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    pub stop: &'a StopChecker,
    pub text: &'a dyn TextDecoder,
}

impl Finish<'_> {
    pub fn check(&self, generated: &[i64]) -> Option<(FinishReason, Option<String>)> {
        let n = generated.len();
        if self.eos.is_some() && generated.last().copied() == self.eos {
            return Some((FinishReason::Eos, None));
        }
        if n >= self.min_new_tokens
            && let Some(s) = self.stop.hit(self.text, generated)
        {
            return Some((FinishReason::Stop, Some(s.to_string())));
        }
        (n >= self.max_new_tokens).then_some((FinishReason::Length, None))
    }
}
