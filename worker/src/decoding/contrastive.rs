//! Contrastive search (Su et al. 2022), as transformers 4.55.4's `_contrastive_search` runs it and as the
//! original deployment used it (`penalty_alpha` 0.6, `top_k` 4).
//!
//! Each step takes the `top_k` most likely next tokens, runs all of them through the model at once (the
//! cache is repeated per candidate), and keeps the candidate with the best
//! `(1 - alpha) * p(token) - alpha * max cosine(candidate's hidden state, every earlier hidden state)`.
//! The degeneration penalty is what keeps contrastive search from looping. The chosen candidate's logits
//! and cache rows are reused for the next step, so a step costs one forward pass of `top_k` rows.

use super::greedy::last_scores;
use super::processors::Processors;
use super::rows::{Finish, Rows};
use super::stop::{StopChecker, TextDecoder};
use super::{Clock, DecodeError, Decoded, Result, i64_tensor, to_vec_i64};
use crate::lm::{CausalLm, KvCache, Logits};
use shared::GenerationPlan;
use tch::{Device, Kind, Tensor};

#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    model: &dyn CausalLm,
    prompts: &[Vec<i64>],
    plan: &GenerationPlan,
    eos: Option<i64>,
    text: &dyn TextDecoder,
    stop: &StopChecker,
    alpha: f64,
    top_k: usize,
    clock: &mut Clock,
) -> Result<Vec<Decoded>> {
    let mut lap = clock.lap();
    let k = top_k.min(model.info().vocab_size).max(1) as i64;
    let processors = Processors::from_plan(plan, eos);
    let finish = Finish {
        eos,
        max_new_tokens: plan.max_new_tokens,
        min_new_tokens: plan.min_new_tokens,
        stop,
        text,
    };
    let mut rows = Rows::new(prompts);
    let padded_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut cache = KvCache::new(model.info().n_layer);
    let inputs = rows.prefill()?;
    let out = model.forward(
        &inputs.ids,
        &inputs.mask,
        &inputs.positions,
        &mut cache,
        Logits::LastOnly,
        true,
    )?;
    let mut logits = last_scores(&out.logits)?;
    let hidden = out.hidden.ok_or_else(|| {
        DecodeError::Invalid("the model returned no hidden states for contrastive search".into())
    })?;
    if hidden.size().get(1).copied() != Some(padded_len as i64) {
        return Err(DecodeError::Invalid(format!(
            "contrastive search needs the hidden state of every prompt position, got shape {:?}",
            hidden.size()
        )));
    }
    // Normalised once: cosine similarity only ever needs the unit vectors.
    let mut context = normalize(&hidden.f_to_kind(Kind::Float)?)?;
    // Only the chosen candidate's logits are used: a model with a separate head computes them for that
    // row alone instead of for all `top_k` (on an 8-layer, 1024-wide model the head is a third of the
    // weights a step reads).
    let separate_head = model.separate_head();
    let candidate_logits = if separate_head {
        Logits::None
    } else {
        Logits::LastOnly
    };
    loop {
        let b = rows.active.len() as i64;
        let scores = if processors.is_noop() {
            logits
        } else {
            processors.apply(logits, &rows.histories(), rows.generated)?
        };
        let probs = scores.f_softmax(-1, Kind::Float)?;
        let (top_probs, top_ids) = probs.f_topk(k, -1, true, true)?;

        // Every candidate extends its prompt's cache.
        cache.repeat_interleave(k);
        let context_len = padded_len + rows.generated;
        let mask = rows
            .mask(context_len + 1)?
            .f_repeat_interleave_self_int(k, 0, None)?;
        let positions: Vec<i64> = rows.active.iter().map(|&p| rows.tokens[p].len() as i64).collect();
        let positions =
            i64_tensor(&positions, b as usize, 1, Device::Cpu)?.f_repeat_interleave_self_int(k, 0, None)?;
        let out = model.forward(
            &top_ids.f_reshape([-1, 1])?,
            &mask,
            &positions,
            &mut cache,
            candidate_logits,
            true,
        )?;
        let raw_hidden = out.hidden.ok_or_else(|| {
            DecodeError::Invalid("the model returned no hidden states for contrastive search".into())
        })?;
        let next_hidden = normalize(&raw_hidden.f_to_kind(Kind::Float)?.f_reshape([b, k, -1])?)?;

        // Degeneration penalty: the highest cosine similarity with any real (unpadded) earlier position.
        let cosine = context.f_bmm(&next_hidden.f_transpose(1, 2)?)?; // [b, context, k]
        let pad = rows
            .mask(context_len)?
            .f_to_device(cosine.device())?
            .f_eq(0)?
            .f_unsqueeze(-1)?;
        let cosine = cosine.f_masked_fill(&pad, f64::from(f32::MIN))?;
        let penalty = cosine.f_amax([1i64].as_slice(), false)?; // [b, k]
        let top_probs = top_probs.f_to_device(penalty.device())?;
        let score = top_probs
            .f_mul_scalar(1.0 - alpha)?
            .f_sub(&penalty.f_mul_scalar(alpha)?)?;
        let selected = to_vec_i64(&score.f_argmax(-1, false)?)?;

        let top_ids = to_vec_i64(&top_ids)?;
        let next: Vec<i64> = selected
            .iter()
            .enumerate()
            .map(|(r, &s)| top_ids[r * k as usize + s as usize])
            .collect();
        let chosen: Vec<i64> = selected
            .iter()
            .enumerate()
            .map(|(r, &s)| r as i64 * k + s)
            .collect();
        let chosen = Tensor::from_slice(&chosen);
        cache.select(&chosen);
        logits = if separate_head {
            let rows = raw_hidden
                .f_reshape([b * k, -1])?
                .f_index_select(0, &chosen.f_to_device(raw_hidden.device())?)?;
            model.head(&rows)?
        } else {
            last_scores(&out.logits)?.f_index_select(0, &chosen.f_to_device(out.logits.device())?)?
        };
        let picked = next_hidden
            .f_reshape([b * k, -1])?
            .f_index_select(0, &chosen.f_to_device(next_hidden.device())?)?;
        context = Tensor::f_cat(&[context, picked.f_unsqueeze(1)?], 1)?;

        rows.push(&next, &finish);
        lap.token();
        if rows.all_done() {
            break;
        }
        if let Some(keep) = rows.retain() {
            let keep = Tensor::from_slice(&keep);
            cache.select(&keep);
            logits = logits.f_index_select(0, &keep.f_to_device(logits.device())?)?;
            context = context.f_index_select(0, &keep.f_to_device(context.device())?)?;
        }
    }
    lap.finish(clock);
    Ok(rows.into_results())
}

/// Unit vectors along the last dimension.
fn normalize(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_div(&t.f_norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)?)?)
}
