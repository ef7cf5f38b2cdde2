//! Beam search, following transformers 4.55.4's vectorised `_beam_search` step for step.
//!
//! Each step scores every running beam's continuations by accumulated log-probability (after the logits
//! processors, which transformers applies to log-probabilities here), keeps the best `2 × num_beams`, and
//! from them (a) the best `num_beams` that did not finish continue, and (b) those among the first
//! `num_beams` that finished (EOS, a stop sequence, or the length limit) compete for the finished set,
//! scored by `log-prob / generated_len ^ length_penalty`. Search ends when no running beam can beat the
//! worst finished one (transformers' heuristic, from the current length), when every finished slot is full
//! and `early_stopping` is set, or at the length limit. The answer is the best finished hypothesis.
//!
//! Score arithmetic is float32 with transformers' `-1e9` sentinels, so rankings and ties match.

use super::greedy::last_scores;
use super::processors::Processors;
use super::rows::Finish;
use super::stop::{StopChecker, TextDecoder};
use super::{Clock, Decoded, Result, i64_tensor, to_vec_f32, to_vec_i64};
use crate::lm::{CausalLm, KvCache, Logits};
use shared::{FinishReason, GenerationPlan};
use tch::{Device, Kind, Tensor};

const NEG: f32 = -1.0e9;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamOptions {
    pub num_beams: usize,
    pub length_penalty: f64,
    pub early_stopping: bool,
}

/// A finished hypothesis slot.
#[derive(Debug, Clone)]
struct Hyp {
    tokens: Vec<i64>,
    score: f32,
    finished: bool,
    reason: (FinishReason, Option<String>),
}

/// Indices of `values` sorted by descending value (stable for ties, as a CPU topk of few elements is).
fn top(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    idx.truncate(k);
    idx
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    model: &dyn CausalLm,
    prompt: &[i64],
    plan: &GenerationPlan,
    eos: Option<i64>,
    text: &dyn TextDecoder,
    stop: &StopChecker,
    opts: &BeamOptions,
    clock: &mut Clock,
) -> Result<Decoded> {
    let mut lap = clock.lap();
    let nb = opts.num_beams;
    let lp = opts.length_penalty;
    let keep = 2 * nb; // max(2, 1 + number of EOS ids) × num_beams
    let processors = Processors::from_plan(plan, eos);
    let finish = Finish {
        eos,
        max_new_tokens: plan.max_new_tokens,
        min_new_tokens: plan.min_new_tokens,
        stop,
        text,
    };
    let vocab = model.info().vocab_size;

    // The prompt runs once; its cache is then shared by every beam.
    let mut cache = KvCache::new(model.info().n_layer);
    let len = prompt.len();
    let ids = i64_tensor(prompt, 1, len, Device::Cpu)?;
    let mask = Tensor::f_ones([1, len as i64], (Kind::Int64, Device::Cpu))?;
    let positions = Tensor::f_arange(len as i64, (Kind::Int64, Device::Cpu))?.f_view([1, -1])?;
    let out = model.forward(&ids, &mask, &positions, &mut cache, Logits::LastOnly, false)?;
    cache.repeat_interleave(nb as i64);
    let mut logits = last_scores(&out.logits)?.f_expand([nb as i64, -1], false)?;

    let mut running: Vec<Vec<i64>> = vec![vec![]; nb];
    let mut running_scores: Vec<f32> = (0..nb).map(|i| if i == 0 { 0.0 } else { NEG }).collect();
    let mut finished: Vec<Hyp> = (0..nb)
        .map(|_| Hyp {
            tokens: vec![],
            score: NEG,
            finished: false,
            reason: (FinishReason::Length, None),
        })
        .collect();
    let mut improvable = true;
    let mut generated = 0usize;
    loop {
        // Accumulated log-probabilities of every continuation of every beam, best `keep` of them.
        let log_probs = logits.f_log_softmax(-1, Kind::Float)?;
        let log_probs = if processors.is_noop() {
            log_probs
        } else {
            let histories: Vec<Vec<i64>> = running.iter().map(|r| [prompt, r].concat()).collect();
            let refs: Vec<&[i64]> = histories.iter().map(Vec::as_slice).collect();
            processors.apply(log_probs, &refs, generated)?
        };
        let scores = Tensor::from_slice(&running_scores)
            .f_to_device(log_probs.device())?
            .f_unsqueeze(1)?;
        let flat = log_probs.f_add(&scores)?.f_reshape([1, -1])?;
        let (top_lp, top_idx) = flat.f_topk(keep.min(nb * vocab) as i64, -1, true, true)?;
        let top_lp = to_vec_f32(&top_lp)?;
        let top_idx = to_vec_i64(&top_idx)?;
        let candidates: Vec<(usize, Vec<i64>)> = top_idx
            .iter()
            .map(|&i| {
                let beam = i as usize / vocab;
                let mut seq = running[beam].clone();
                seq.push(i % vocab as i64);
                (beam, seq)
            })
            .collect();
        let ends: Vec<Option<(FinishReason, Option<String>)>> =
            candidates.iter().map(|(_, seq)| finish.check(seq)).collect();

        // The best unfinished continuations run on.
        let running_lp: Vec<f32> = top_lp
            .iter()
            .zip(&ends)
            .map(|(&s, e)| s + if e.is_some() { NEG } else { 0.0 })
            .collect();
        let next_running = top(&running_lp, nb);
        let sources: Vec<i64> = next_running.iter().map(|&j| candidates[j].0 as i64).collect();
        running = next_running.iter().map(|&j| candidates[j].1.clone()).collect();
        running_scores = next_running.iter().map(|&j| running_lp[j]).collect();

        // Finished ones among the first `num_beams` compete for the finished slots.
        let denom = ((generated + 1) as f64).powf(lp) as f32;
        let full = opts.early_stopping && finished.iter().all(|h| h.finished);
        let mut merged: Vec<Hyp> = finished.clone();
        for (j, (lp_j, (_, seq))) in top_lp.iter().zip(&candidates).enumerate() {
            let just_finished = ends[j].is_some() && j < nb;
            let mut s = lp_j / denom;
            s += if full { NEG } else { 0.0 };
            s += if improvable { 0.0 } else { NEG };
            s += if just_finished { 0.0 } else { NEG };
            merged.push(Hyp {
                tokens: seq.clone(),
                score: s,
                finished: just_finished,
                reason: ends[j].clone().unwrap_or((FinishReason::Length, None)),
            });
        }
        let merged_scores: Vec<f32> = merged.iter().map(|h| h.score).collect();
        finished = top(&merged_scores, nb)
            .into_iter()
            .map(|i| merged[i].clone())
            .collect();

        generated += 1;
        lap.token();

        // transformers' stopping heuristic (early_stopping true or false; "never" is not offered).
        let best_possible = running_scores[0] / (generated as f64).powf(lp) as f32;
        let worst = finished.iter().map(|h| h.score).fold(f32::INFINITY, f32::min);
        improvable = improvable
            && finished
                .iter()
                .any(|h| best_possible > if h.finished { worst } else { NEG });
        let open = !(opts.early_stopping && finished.iter().all(|h| h.finished));
        let continuable = !ends.iter().all(Option::is_some);
        if !(improvable && open && continuable) {
            break;
        }

        cache.select(&Tensor::from_slice(&sources));
        let ids: Vec<i64> = running.iter().map(|r| *r.last().unwrap_or(&0)).collect();
        let total = len + generated;
        let ids = i64_tensor(&ids, nb, 1, Device::Cpu)?;
        let mask = Tensor::f_ones([nb as i64, total as i64], (Kind::Int64, Device::Cpu))?;
        let positions = Tensor::f_full([nb as i64, 1], (total - 1) as i64, (Kind::Int64, Device::Cpu))?;
        logits = last_scores(
            &model
                .forward(&ids, &mask, &positions, &mut cache, Logits::LastOnly, false)?
                .logits,
        )?;
    }
    lap.finish(clock);
    let best = finished.swap_remove(0);
    Ok(Decoded {
        tokens: best.tokens,
        finish_reason: best.reason.0,
        stop: best.reason.1,
    })
}
