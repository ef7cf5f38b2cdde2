//! One sequence of the running batch: its tokens and the rules that end it ([`Common`]), what a step
//! decides for it ([`Choice`]), and what every step needs besides ([`Context`]). Each strategy's state
//! machine (`machine`) works on these, advanced one step at a time by the scheduler.
//!
//! A step has two halves around the batch's forward pass. `choose` reads the logits of the last pass and
//! decides what the sequence feeds next (one token; `top_k` candidates for contrastive search; one token per
//! beam), or that it is done. `absorb` (contrastive search only) reads the pass's hidden states and picks
//! the candidate. Batch of one or batch of a hundred, a sequence runs through the same code.

use super::constraint::Constraint;
use super::error::Result;
use super::finish::{Decoded, Finish};
use super::processors::Processors;
use super::stop::{StopChecker, TextDecoder};
use crate::lm::CausalLm;
use shared::{GenerationPlan, TokenLogprob};

/// What every step needs besides the sequence: the model, the text decoder (stop sequences) and the model's
/// EOS (which a sequence's plan may ignore, see [`Common::new`]).
pub(crate) struct Context<'a> {
    pub model: &'a dyn CausalLm,
    pub text: &'a dyn TextDecoder,
    pub eos: Option<i64>,
}

/// A sequence's decision for the next pass.
pub(crate) enum Choice {
    /// Feed these tokens (one per row, or the candidates of a contrastive row).
    Feed(Vec<i64>),
    /// Finished: the sequence leaves the batch.
    Done(Decoded),
}

/// A sequence's tokens and stopping rules, whatever its strategy.
pub(crate) struct Common {
    /// The prompt, then the generated tokens.
    pub tokens: Vec<i64>,
    pub prompt_len: usize,
    pub processors: Processors,
    pub stop: StopChecker,
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    /// The grammar the text must follow, advanced by each generated token.
    pub grammar: Option<Constraint>,
    /// Alternatives wanted with each generated token's log-probability; `None`: none are reported.
    pub logprobs: Option<usize>,
    /// The generated tokens' log-probabilities so far (when `logprobs` is set).
    pub token_logprobs: Vec<TokenLogprob>,
    /// The prompt's log-probabilities, from its prefill (when the plan asked for them).
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
    /// The token that ends this sequence: the model's EOS, or none when the plan ignores it.
    pub eos: Option<i64>,
}

impl Common {
    /// A sequence of `prompt` under `plan`, in a model whose end-of-sequence token is `eos`, following
    /// `grammar` if it has one. A plan that ignores EOS (vLLM's `ignore_eos`) sees none: the token neither
    /// ends the sequence nor is masked before `min_new_tokens`, whatever the strategy, so the sequence runs
    /// to `max_new_tokens` or a stop sequence.
    pub fn new(prompt: &[i64], plan: &GenerationPlan, eos: Option<i64>, grammar: Option<Constraint>) -> Self {
        let eos = eos.filter(|_| !plan.ignore_eos);
        Self {
            tokens: prompt.to_vec(),
            prompt_len: prompt.len(),
            processors: Processors::from_plan(plan, eos),
            stop: StopChecker::new(&plan.stop),
            max_new_tokens: plan.max_new_tokens,
            min_new_tokens: plan.min_new_tokens,
            grammar,
            logprobs: plan.logprobs,
            token_logprobs: Vec::new(),
            prompt_logprobs: None,
            eos,
        }
    }

    pub fn generated(&self) -> &[i64] {
        &self.tokens[self.prompt_len..]
    }

    pub fn finish<'a>(&'a self, ctx: &'a Context<'_>) -> Finish<'a> {
        Finish {
            eos: self.eos,
            max_new_tokens: self.max_new_tokens,
            min_new_tokens: self.min_new_tokens,
            stop: &self.stop,
            text: ctx.text,
        }
    }

    /// Appends a generated token; the result when it ended the sequence. A token its grammar does not
    /// allow (masking prevents it) fails the sequence.
    pub fn push(&mut self, token: i64, ctx: &Context<'_>) -> Result<Option<Decoded>> {
        if let Some(g) = &mut self.grammar {
            g.advance(token)?;
        }
        self.tokens.push(token);
        let generated = self.generated();
        Ok(self.finish(ctx).check(generated).map(|(reason, stop)| Decoded {
            tokens: generated.to_vec(),
            finish_reason: reason,
            stop,
            logprobs: self.logprobs.map(|_| self.token_logprobs.clone()),
        }))
    }
}
