//! Greedy search and multinomial sampling: one forward pass per step, one token per prompt.
//!
//! They share a loop (transformers' `_sample`) and differ only in the pick: the highest processed score, or a
//! draw from the warped distribution ([`super::sample`]). Per step the host waits for the model once, to
//! read the chosen ids; everything else stays on the model's device.

use super::processors::Processors;
use super::rows::{Finish, Rows};
use super::sample::Sampler;
use super::stop::{StopChecker, TextDecoder};
use super::{Clock, Decoded, Result, to_vec_i64};
use crate::lm::{CausalLm, KvCache, Logits};
use shared::GenerationPlan;
use tch::Tensor;

#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    model: &dyn CausalLm,
    prompts: &[Vec<i64>],
    plan: &GenerationPlan,
    eos: Option<i64>,
    text: &dyn TextDecoder,
    stop: &StopChecker,
    sampler: Option<&Sampler>,
    clock: &mut Clock,
) -> Result<Vec<Decoded>> {
    let mut lap = clock.lap();
    let processors = Processors::from_plan(plan, eos);
    let finish = Finish {
        eos,
        max_new_tokens: plan.max_new_tokens,
        min_new_tokens: plan.min_new_tokens,
        stop,
        text,
    };
    let mut rngs: Vec<_> = match sampler {
        Some(s) => prompts.iter().map(|_| s.rng()).collect(),
        None => vec![],
    };
    let mut rows = Rows::new(prompts);
    let mut cache = KvCache::new(model.info().n_layer);
    let inputs = rows.prefill()?;
    let mut logits = model
        .forward(
            &inputs.ids,
            &inputs.mask,
            &inputs.positions,
            &mut cache,
            Logits::LastOnly,
            false,
        )?
        .logits;
    loop {
        let scores = last_scores(&logits)?;
        let scores = if processors.is_noop() {
            scores
        } else {
            processors.apply(scores, &rows.histories(), rows.generated)?
        };
        let next = match sampler {
            None => to_vec_i64(&scores.f_argmax(-1, false)?)?,
            Some(s) => s.pick(&scores, &mut rngs, &rows.active)?,
        };
        rows.push(&next, &finish);
        lap.token();
        if rows.all_done() {
            break;
        }
        if let Some(keep) = rows.retain() {
            cache.select(&Tensor::from_slice(&keep));
        }
        let inputs = rows.step()?;
        logits = model
            .forward(
                &inputs.ids,
                &inputs.mask,
                &inputs.positions,
                &mut cache,
                Logits::LastOnly,
                false,
            )?
            .logits;
    }
    lap.finish(clock);
    Ok(rows.into_results())
}

/// `[batch, seq, vocab]` -> the last position's `[batch, vocab]` scores as float32.
pub(crate) fn last_scores(logits: &Tensor) -> Result<Tensor> {
    Ok(logits.f_select(1, -1)?.f_to_kind(tch::Kind::Float)?)
}
