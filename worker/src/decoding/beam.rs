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
//! In the running batch a search holds `num_beams` cache rows; keeping the best continuations reorders
//! those rows (a copy of this sequence's keys, as transformers' `_reorder_cache`), never the others'.
//!
//! Score arithmetic is float32 with transformers' `-1e9` sentinels, so rankings and ties match.

use super::constraint::{Constraint, apply_masks};
use super::error::Result;
use super::finish::Decoded;
use super::sequence::{Choice, Common, Context};
use super::tensors::{to_vec_f32, to_vec_i64};
use shared::FinishReason;
use tch::{Kind, Tensor};

const NEG: f32 = -1.0e9;

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

pub(crate) struct Beam {
    nb: usize,
    length_penalty: f64,
    early_stopping: bool,
    running: Vec<Vec<i64>>,
    running_scores: Vec<f32>,
    finished: Vec<Hyp>,
    improvable: bool,
    generated: usize,
    /// Each running beam's grammar state (forked from the sequence's at the first step); empty without one.
    grammars: Vec<Constraint>,
}

impl Beam {
    pub fn new(num_beams: usize, length_penalty: f64, early_stopping: bool) -> Self {
        let nb = num_beams.max(1);
        Self {
            nb,
            length_penalty,
            early_stopping,
            running: vec![vec![]; nb],
            // Only the first beam is live at the start: the others are copies of it.
            running_scores: (0..nb).map(|i| if i == 0 { 0.0 } else { NEG }).collect(),
            finished: (0..nb)
                .map(|_| Hyp {
                    tokens: vec![],
                    score: NEG,
                    finished: false,
                    reason: (FinishReason::Length, None),
                })
                .collect(),
            improvable: true,
            generated: 0,
            grammars: Vec::new(),
        }
    }

    pub fn num_beams(&self) -> usize {
        self.nb
    }

    /// One step from the beams' logits (`[num_beams, vocab]`): the tokens the surviving beams feed and the
    /// beam each continues (`sources[j]`: the row beam `j`'s cache must become a copy of), or the answer.
    pub fn choose(
        &mut self,
        seq: &mut Common,
        logits: &Tensor,
        ctx: &Context<'_>,
    ) -> Result<(Choice, Vec<i64>)> {
        let nb = self.nb;
        let lp = self.length_penalty;
        let keep = 2 * nb; // max(2, 1 + number of EOS ids) × num_beams
        let vocab = ctx.model.info().vocab_size;
        let prompt = &seq.tokens[..seq.prompt_len];
        let finish = seq.finish(ctx);

        // Accumulated log-probabilities of every continuation of every beam, best `keep` of them.
        let log_probs = logits.f_to_kind(Kind::Float)?.f_log_softmax(-1, Kind::Float)?;
        let log_probs = if seq.processors.is_noop() {
            log_probs
        } else {
            let histories: Vec<Vec<i64>> = self.running.iter().map(|r| [prompt, r].concat()).collect();
            let refs: Vec<&[i64]> = histories.iter().map(Vec::as_slice).collect();
            seq.processors.apply(log_probs, &refs, self.generated)?
        };
        // A constrained search masks each beam's continuations with that beam's own grammar state.
        if self.grammars.is_empty()
            && let Some(g) = &seq.grammar
        {
            self.grammars = vec![g.clone(); nb];
        }
        let log_probs = if self.grammars.is_empty() {
            log_probs
        } else {
            let mut refs: Vec<&mut Constraint> = self.grammars.iter_mut().collect();
            Constraint::refresh_all(&mut refs)
                .into_iter()
                .collect::<Result<Vec<()>>>()?;
            let masks: Vec<Option<&[u32]>> = self.grammars.iter().map(Constraint::mask).collect();
            apply_masks(log_probs, &masks)?
        };
        let scores = Tensor::from_slice(&self.running_scores)
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
                let mut s = self.running[beam].clone();
                s.push(i % vocab as i64);
                (beam, s)
            })
            .collect();
        let ends: Vec<Option<(FinishReason, Option<String>)>> =
            candidates.iter().map(|(_, s)| finish.check(s)).collect();

        // The best unfinished continuations run on.
        let running_lp: Vec<f32> = top_lp
            .iter()
            .zip(&ends)
            .map(|(&s, e)| s + if e.is_some() { NEG } else { 0.0 })
            .collect();
        let next_running = top(&running_lp, nb);
        let sources: Vec<i64> = next_running.iter().map(|&j| candidates[j].0 as i64).collect();
        if !self.grammars.is_empty() {
            let mut forked = Vec::with_capacity(nb);
            for &j in &next_running {
                let (beam, s) = &candidates[j];
                let mut g = self.grammars[*beam].clone();
                // A continuation its grammar ruled out (-inf) only runs when fewer are allowed than there
                // are beams; it can never win, and its state stays where it was.
                if running_lp[j].is_finite() {
                    g.advance(*s.last().unwrap_or(&0))?;
                }
                forked.push(g);
            }
            self.grammars = forked;
        }
        self.running = next_running.iter().map(|&j| candidates[j].1.clone()).collect();
        self.running_scores = next_running.iter().map(|&j| running_lp[j]).collect();

        // Finished ones among the first `num_beams` compete for the finished slots.
        let denom = ((self.generated + 1) as f64).powf(lp) as f32;
        let full = self.early_stopping && self.finished.iter().all(|h| h.finished);
        let mut merged: Vec<Hyp> = self.finished.clone();
        for (j, (lp_j, (_, s))) in top_lp.iter().zip(&candidates).enumerate() {
            let just_finished = ends[j].is_some() && j < nb;
            let mut score = lp_j / denom;
            score += if full { NEG } else { 0.0 };
            score += if self.improvable { 0.0 } else { NEG };
            score += if just_finished { 0.0 } else { NEG };
            merged.push(Hyp {
                tokens: s.clone(),
                score,
                finished: just_finished,
                reason: ends[j].clone().unwrap_or((FinishReason::Length, None)),
            });
        }
        let merged_scores: Vec<f32> = merged.iter().map(|h| h.score).collect();
        self.finished = top(&merged_scores, nb)
            .into_iter()
            .map(|i| merged[i].clone())
            .collect();
        self.generated += 1;

        // transformers' stopping heuristic (early_stopping true or false; "never" is not offered).
        let best_possible = self.running_scores[0] / (self.generated as f64).powf(lp) as f32;
        let worst = self
            .finished
            .iter()
            .map(|h| h.score)
            .fold(f32::INFINITY, f32::min);
        self.improvable = self.improvable
            && self
                .finished
                .iter()
                .any(|h| best_possible > if h.finished { worst } else { NEG });
        let open = !(self.early_stopping && self.finished.iter().all(|h| h.finished));
        let continuable = !ends.iter().all(Option::is_some);
        if !(self.improvable && open && continuable) {
            let best = self.finished.swap_remove(0);
            seq.tokens.truncate(seq.prompt_len);
            seq.tokens.extend_from_slice(&best.tokens);
            return Ok((
                Choice::Done(Decoded {
                    tokens: best.tokens,
                    finish_reason: best.reason.0,
                    stop: best.reason.1,
                    logprobs: None,
                }),
                sources,
            ));
        }
        let feed = self.running.iter().map(|r| *r.last().unwrap_or(&0)).collect();
        Ok((Choice::Feed(feed), sources))
    }
}
