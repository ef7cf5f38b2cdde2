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
mod constraint;
pub mod contrastive;
mod error;
mod finish;
pub mod greedy;
mod machine;
pub mod processors;
pub mod sample;
pub mod scheduler;
mod select;
mod sequence;
pub mod stop;
mod tensors;

use crate::lm::CausalLm;
use shared::GenerationPlan;
use std::collections::HashMap;

pub use constraint::Constraint;
#[cfg(test)]
pub(crate) use constraint::allowed;
pub use error::{DecodeError, Result, panic_message};
pub use finish::Decoded;
pub use scheduler::{Event, FinishedSequence, JoinPolicy, Limits, Request, Scheduler, Stats, StepProfile};
pub use stop::{StopChecker, TextDecoder};
pub use tensors::readbacks;

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
                grammar: None,
                lane: shared::Lane::Interactive,
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

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
