//! Decoding: turns a model's next-token logits into text, with the strategy a job asks for.
//!
//! Every strategy runs on any [`CausalLm`], so it is written and tested once whatever the model's placement.
//! The behaviour is that of transformers 4.55.4's `generate` (the reference the original deployment used):
//! the same logits processors in the same order ([`processors`]), `min_new_tokens` masking EOS, contrastive
//! search's degeneration penalty ([`contrastive`]), beam search's length-normalised hypotheses and
//! `early_stopping` rules ([`beam`]). Two things are ours: stop sequences ([`stop`]), checked on decoded text,
//! and batches, where each prompt gets exactly the tokens it gets alone (transformers lets the padding of a
//! batch leak into the repetition penalty; we do not), and a finished prompt leaves the batch instead of
//! being padded along.

pub mod beam;
pub mod contrastive;
pub mod greedy;
pub mod processors;
mod rows;
pub mod sample;
pub mod stop;

use crate::lm::CausalLm;
use shared::{Decoding, FinishReason, GenerationPlan};
use tch::{Device, Kind, Tensor};

pub use stop::{StopChecker, TextDecoder};

/// Why decoding failed: the model or a tensor operation reported an error.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] tch::TchError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, DecodeError>;

/// What one prompt produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Generated token ids only, as transformers returns them after the prompt: the EOS token that ended a
    /// sequence is included, and so is the token that completed a stop sequence.
    pub tokens: Vec<i64>,
    pub finish_reason: FinishReason,
    /// The stop sequence that ended the text, when `finish_reason` is `Stop`.
    pub stop: Option<String>,
}

/// A batch's outcome and where its time went.
#[derive(Debug, Clone)]
pub struct BatchOutput {
    pub results: Vec<Decoded>,
    /// The prompt's forward pass (or passes, for a batch decoded prompt by prompt).
    pub prefill_ms: u64,
    /// Every step after the prefill.
    pub decode_ms: u64,
}

/// Wall-clock split between the prefill and the decoding steps.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Clock {
    pub prefill: std::time::Duration,
    pub decode: std::time::Duration,
}

impl Clock {
    /// Starts timing one decoding loop: the time to its first token is prefill, the rest decode.
    pub(crate) fn lap(&self) -> Lap {
        Lap {
            start: std::time::Instant::now(),
            first_token: None,
        }
    }
}

/// One decoding loop's timing, added to its [`Clock`] by [`Lap::finish`] (loops add up: beam search runs
/// a batch prompt by prompt).
pub(crate) struct Lap {
    start: std::time::Instant,
    first_token: Option<std::time::Instant>,
}

impl Lap {
    /// Call after each step's tokens are in; only the first call counts.
    pub(crate) fn token(&mut self) {
        self.first_token.get_or_insert_with(std::time::Instant::now);
    }

    pub(crate) fn finish(self, clock: &mut Clock) {
        let end = std::time::Instant::now();
        let first = self.first_token.unwrap_or(end);
        clock.prefill += first - self.start;
        clock.decode += end - first;
    }
}

/// Generates a continuation for each prompt (token ids, none empty) with the plan's strategy.
///
/// `eos` is the model's end-of-sequence id (generation ends there and `min_new_tokens` masks it); `text`
/// decodes ids for stop sequences. Runs under `no_grad`.
pub fn generate(
    model: &dyn CausalLm,
    prompts: &[Vec<i64>],
    plan: &GenerationPlan,
    eos: Option<i64>,
    text: &dyn TextDecoder,
) -> Result<BatchOutput> {
    if prompts.iter().any(|p| p.is_empty()) {
        return Err(DecodeError::Invalid("a prompt has no tokens".into()));
    }
    if prompts.is_empty() {
        return Ok(BatchOutput {
            results: vec![],
            prefill_ms: 0,
            decode_ms: 0,
        });
    }
    let stop = StopChecker::new(&plan.stop);
    let mut clock = Clock::default();
    let results = tch::no_grad(|| -> Result<Vec<Decoded>> {
        // transformers runs contrastive search with top_k 1 or alpha 0, and beam search with one beam, as
        // greedy search; the results are the same and greedy is cheaper.
        match &plan.decoding {
            Decoding::Greedy => greedy::run(model, prompts, plan, eos, text, &stop, None, &mut clock),
            Decoding::Contrastive { penalty_alpha, top_k } if *penalty_alpha > 0.0 && *top_k > 1 => {
                contrastive::run(
                    model,
                    prompts,
                    plan,
                    eos,
                    text,
                    &stop,
                    *penalty_alpha,
                    *top_k,
                    &mut clock,
                )
            }
            Decoding::Contrastive { .. } => {
                greedy::run(model, prompts, plan, eos, text, &stop, None, &mut clock)
            }
            Decoding::Sample {
                temperature,
                top_k,
                top_p,
                typical_p,
                seed,
            } => {
                let sampler = sample::Sampler {
                    temperature: *temperature,
                    top_k: *top_k,
                    top_p: *top_p,
                    typical_p: *typical_p,
                    seed: *seed,
                };
                greedy::run(model, prompts, plan, eos, text, &stop, Some(&sampler), &mut clock)
            }
            Decoding::Beam { num_beams, .. } if *num_beams <= 1 => {
                greedy::run(model, prompts, plan, eos, text, &stop, None, &mut clock)
            }
            Decoding::Beam {
                num_beams,
                length_penalty,
                early_stopping,
            } => {
                let opts = beam::BeamOptions {
                    num_beams: *num_beams,
                    length_penalty: *length_penalty,
                    early_stopping: *early_stopping,
                };
                // Beams already make a batch; prompts are searched one after the other.
                prompts
                    .iter()
                    .map(|p| beam::run(model, p, plan, eos, text, &stop, &opts, &mut clock))
                    .collect()
            }
        }
    })?;
    Ok(BatchOutput {
        results,
        prefill_ms: clock.prefill.as_millis() as u64,
        decode_ms: clock.decode.as_millis() as u64,
    })
}

/// Copies a (small) tensor to the CPU as a flat vector.
pub(crate) fn to_vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    let flat = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_reshape([-1])?;
    Ok(Vec::<f32>::try_from(&flat)?)
}

pub(crate) fn to_vec_i64(t: &Tensor) -> Result<Vec<i64>> {
    let flat = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Int64)?
        .f_reshape([-1])?;
    Ok(Vec::<i64>::try_from(&flat)?)
}

/// An int64 tensor `[rows, cols]` from row-major values.
pub(crate) fn i64_tensor(values: &[i64], rows: usize, cols: usize, device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(values)?
        .f_reshape([rows as i64, cols as i64])?
        .f_to_device(device)?)
}

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
