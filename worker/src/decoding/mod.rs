//! Decoding: turns a model's next-token logits into text, with the strategy a job asks for.
//!
//! Every strategy runs on any [`CausalLm`], so it is written and tested once whatever the model's placement.
//! The behaviour is that of transformers 4.55.4's `generate` (the reference the original deployment used):
//! the same logits processors in the same order ([`processors`]), `min_new_tokens` masking EOS, contrastive
//! search's degeneration penalty ([`contrastive`]), beam search's length-normalised hypotheses and
//! `early_stopping` rules ([`beam`]). Two things are ours: stop sequences ([`stop`]), checked on decoded text,
//! and continuous batching ([`scheduler`]), where sequences of every strategy join and leave one running
//! batch between steps and each gets exactly the tokens it gets alone (transformers lets the padding of a
//! batch leak into the repetition penalty; we do not).

pub mod beam;
pub mod contrastive;
mod finish;
pub mod greedy;
pub mod processors;
pub mod sample;
pub mod scheduler;
mod sequence;
pub mod stop;

use crate::lm::CausalLm;
use shared::{FinishReason, GenerationPlan};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

pub use scheduler::{Event, Finished, Limits, Request, Scheduler, Stats};
pub use stop::{StopChecker, TextDecoder};

/// Why decoding failed: the model or a tensor operation reported an error.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] tch::TchError),
    #[error("{0}")]
    Invalid(String),
    /// The sequence can never fit the batch's KV budget.
    #[error("{0}")]
    TooLarge(String),
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
    /// Start to the first token of the slowest prompt (its prefill and first step).
    pub prefill_ms: u64,
    /// Every step after that.
    pub decode_ms: u64,
    /// Each scheduler step's wall time (admission, prefills and the decode pass), in milliseconds.
    pub step_ms: Vec<f64>,
}

/// Generates a continuation for each prompt (token ids, none empty) with the plan's strategy: every prompt
/// joins one [`Scheduler`] at once and runs to its end, exactly as jobs do in the worker.
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
    let started = std::time::Instant::now();
    let mut results: HashMap<u64, Decoded> = HashMap::new();
    let mut first_token = std::time::Duration::ZERO;
    let mut step_ms = Vec::new();
    tch::no_grad(|| -> Result<()> {
        let mut scheduler = Scheduler::new(model, text, Limits::unbounded());
        scheduler.set_eos(eos);
        for (i, p) in prompts.iter().enumerate() {
            let request = Request {
                id: i as u64,
                prompt: p.clone(),
                plan: plan.clone(),
            };
            scheduler.submit(request)?;
        }
        while scheduler.has_work() {
            let step = std::time::Instant::now();
            let events = scheduler.step();
            step_ms.push(step.elapsed().as_secs_f64() * 1e3);
            for event in events {
                if let Event::Finished { id, result } = event {
                    let f = result?;
                    first_token = first_token.max(f.time_to_first_token);
                    results.insert(id, f.decoded);
                }
            }
        }
        Ok(())
    })?;
    let total = started.elapsed();
    let results = (0..prompts.len() as u64)
        .map(|i| {
            results
                .remove(&i)
                .ok_or_else(|| DecodeError::Invalid(format!("prompt {i} got no result")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(BatchOutput {
        results,
        prefill_ms: first_token.as_millis() as u64,
        decode_ms: total.saturating_sub(first_token).as_millis() as u64,
        step_ms,
    })
}

/// A caught panic's message (libtorch raises through `tch` as panics).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic")
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
