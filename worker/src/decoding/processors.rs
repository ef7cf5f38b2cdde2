//! Logits processors: the edits transformers makes to next-token scores before a strategy picks.
//!
//! Order and arithmetic follow `_get_logits_processor` in transformers 4.55.4: repetition penalty, n-gram
//! blocking, `min_new_tokens` (EOS masked), then, for sampling only, temperature, top-k, top-p, min-p and
//! typical-p.
//! They run as libtorch operations on the scores tensor where it lives, the same kernels transformers calls,
//! so ties break the same way and nothing is copied to the host.

use super::error::Result;
use super::tensors::i64_tensor;
use tch::{Kind, Tensor};

/// The processors every strategy applies.
#[derive(Debug, Clone, Default)]
pub struct Processors {
    pub repetition_penalty: Option<f64>,
    pub no_repeat_ngram_size: Option<usize>,
    pub min_new_tokens: usize,
    pub eos: Option<i64>,
}

impl Processors {
    pub fn from_plan(plan: &shared::GenerationPlan, eos: Option<i64>) -> Self {
        Self {
            repetition_penalty: plan.repetition_penalty,
            no_repeat_ngram_size: plan.no_repeat_ngram_size,
            min_new_tokens: plan.min_new_tokens,
            eos,
        }
    }

    /// Applies the processors to `scores` (`[rows, vocab]` float32); `histories[r]` is row r's prompt and
    /// generated tokens (no padding), `generated` how many tokens each row has generated so far.
    pub fn apply(&self, scores: Tensor, histories: &[&[i64]], generated: usize) -> Result<Tensor> {
        let mut scores = scores;
        if let Some(penalty) = self.repetition_penalty {
            scores = repetition_penalty(&scores, histories, penalty)?;
        }
        if let Some(n) = self.no_repeat_ngram_size {
            scores = no_repeat_ngram(scores, histories, n)?;
        }
        if let Some(eos) = self.eos
            && generated < self.min_new_tokens
        {
            scores = scores.f_index_fill(
                1,
                &Tensor::from_slice(&[eos]).to_device(scores.device()),
                f64::NEG_INFINITY,
            )?;
        }
        Ok(scores)
    }

    pub fn is_noop(&self) -> bool {
        self.repetition_penalty.is_none() && self.no_repeat_ngram_size.is_none() && self.min_new_tokens == 0
    }
}

/// CTRL's repetition penalty on every token present in the row: negative scores are multiplied by the
/// penalty, positive ones divided.
pub fn repetition_penalty(scores: &Tensor, histories: &[&[i64]], penalty: f64) -> Result<Tensor> {
    // Rows of different lengths are padded with their own first token: gather/scatter of a duplicate index
    // writes the same value twice.
    let width = histories.iter().map(|h| h.len()).max().unwrap_or(0).max(1);
    let mut idx = Vec::with_capacity(histories.len() * width);
    for h in histories {
        let fill = h.first().copied().unwrap_or(0);
        idx.extend_from_slice(h);
        idx.extend(std::iter::repeat_n(fill, width - h.len()));
    }
    let idx = i64_tensor(&idx, histories.len(), width, scores.device())?;
    let score = scores.f_gather(1, &idx, false)?;
    let penalised = score
        .f_mul_scalar(penalty)?
        .f_where_self(&score.f_lt(0.0)?, &score.f_div_scalar(penalty)?)?;
    Ok(scores.f_scatter(1, &idx, &penalised)?)
}

/// Tokens that would repeat an n-gram already in `history` (transformers' `NoRepeatNGramLogitsProcessor`).
pub fn banned_ngram_tokens(history: &[i64], n: usize) -> Vec<i64> {
    let len = history.len();
    if n == 0 || len + 1 < n {
        return vec![];
    }
    let key = &history[len + 1 - n..];
    let mut banned = Vec::new();
    for start in 0..(len + 1).saturating_sub(n) {
        if &history[start..start + n - 1] == key {
            banned.push(history[start + n - 1]);
        }
    }
    banned
}

fn no_repeat_ngram(scores: Tensor, histories: &[&[i64]], n: usize) -> Result<Tensor> {
    let scores = scores.f_detach_copy()?;
    for (row, h) in histories.iter().enumerate() {
        let banned = banned_ngram_tokens(h, n);
        if !banned.is_empty() {
            let idx = Tensor::from_slice(&banned).to_device(scores.device());
            let _ = scores
                .f_get(row as i64)?
                .f_index_fill_(0, &idx, f64::NEG_INFINITY)?;
        }
    }
    Ok(scores)
}

/// `scores / temperature`.
pub fn temperature(scores: &Tensor, t: f64) -> Result<Tensor> {
    Ok(scores.f_div_scalar(t)?)
}

/// Keeps the `k` highest scores (and any tied with the k-th).
pub fn top_k(scores: &Tensor, k: usize) -> Result<Tensor> {
    let vocab = scores.size().last().copied().unwrap_or(0);
    let k = (k as i64).min(vocab);
    let (values, _) = scores.f_topk(k, -1, true, true)?;
    let kth = values.f_narrow(-1, k - 1, 1)?;
    Ok(scores.f_masked_fill(&scores.f_lt_tensor(&kth)?, f64::NEG_INFINITY)?)
}

/// Keeps the smallest set of most likely tokens whose probability reaches `p`.
pub fn top_p(scores: &Tensor, p: f64) -> Result<Tensor> {
    top_p_rows(scores, &row_column(scores, (1.0 - p) as f32)?)
}

/// [`top_p`] with each row's own `1 - p` in `limit` (`[rows, 1]` float32): tokens whose cumulative
/// probability, least likely first, is at most the limit are removed; a limit below 0 removes nothing.
pub fn top_p_rows(scores: &Tensor, limit: &Tensor) -> Result<Tensor> {
    let (sorted, indices) = scores.f_sort(-1, false)?;
    let cumulative = sorted.f_softmax(-1, Kind::Float)?.f_cumsum(-1, Kind::Float)?;
    let remove = cumulative.f_le_tensor(limit)?;
    // Always keep the most likely token (min_tokens_to_keep = 1).
    let vocab = remove.size().last().copied().unwrap_or(1);
    let _ = remove.f_narrow(-1, vocab - 1, 1)?.f_fill_(0)?;
    let remove = remove.f_scatter(1, &indices, &remove)?;
    Ok(scores.f_masked_fill(&remove, f64::NEG_INFINITY)?)
}

/// Min-p sampling (transformers' `MinPLogitsWarper`, vLLM's `min_p`): removes tokens whose probability is
/// below `min_p` times the likeliest token's.
pub fn min_p(scores: &Tensor, min_p: f64) -> Result<Tensor> {
    min_p_rows(scores, &row_column(scores, min_p as f32)?)
}

/// [`min_p`] with each row's own `min_p` in `min_p` (`[rows, 1]` float32); a row's 0 removes nothing. The
/// likeliest token always stays (`min_p` is at most 1), which is transformers' `min_tokens_to_keep` of 1.
pub fn min_p_rows(scores: &Tensor, min_p: &Tensor) -> Result<Tensor> {
    let probs = scores.f_softmax(-1, Kind::Float)?;
    let top = probs.f_amax([-1i64].as_slice(), true)?;
    let remove = probs.f_lt_tensor(&top.f_mul(min_p)?)?;
    Ok(scores.f_masked_fill(&remove, f64::NEG_INFINITY)?)
}

/// Typical sampling: keeps tokens whose information content is closest to the distribution's entropy,
/// up to mass `p`.
pub fn typical_p(scores: &Tensor, p: f64) -> Result<Tensor> {
    typical_p_rows(scores, &row_column(scores, p as f32)?)
}

/// [`typical_p`] with each row's own mass in `mass` (`[rows, 1]` float32).
pub fn typical_p_rows(scores: &Tensor, mass: &Tensor) -> Result<Tensor> {
    let normalized = scores.f_log_softmax(-1, Kind::Float)?;
    let probs = normalized.f_exp()?;
    let ent = normalized
        .f_mul(&probs)?
        .f_nansum([-1i64].as_slice(), true, Kind::Float)?
        .f_neg()?;
    let shifted = normalized.f_neg()?.f_sub(&ent)?.f_abs()?;
    let (sorted_scores, sorted_indices) = shifted.f_sort(-1, false)?;
    let sorted_logits = scores.f_gather(-1, &sorted_indices, false)?;
    let cumulative = sorted_logits
        .f_softmax(-1, Kind::Float)?
        .f_cumsum(-1, Kind::Float)?;
    let vocab = sorted_scores.size().last().copied().unwrap_or(1);
    let last_ind = cumulative
        .f_lt_tensor(mass)?
        .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Int64)?
        .f_clamp_max(vocab - 1)?;
    let threshold = sorted_scores.f_gather(1, &last_ind.f_view([-1, 1])?, false)?;
    let remove = sorted_scores.f_gt_tensor(&threshold)?;
    let _ = remove.f_narrow(-1, 0, 1)?.f_fill_(0)?;
    let remove = remove.f_scatter(1, &sorted_indices, &remove)?;
    Ok(scores.f_masked_fill(&remove, f64::NEG_INFINITY)?)
}

/// A `[rows, 1]` float32 column of `value`, on `scores`' device.
fn row_column(scores: &Tensor, value: f32) -> Result<Tensor> {
    let rows = scores.size().first().copied().unwrap_or(1);
    Ok(Tensor::f_full(
        [rows, 1],
        value as f64,
        (Kind::Float, scores.device()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: &[f32]) -> Tensor {
        Tensor::from_slice(v).view([1, -1])
    }

    fn vec(t: &Tensor) -> Vec<f32> {
        crate::decoding::tensors::to_vec_f32(t).unwrap()
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_scores_of_seen_tokens() {
        let s = row(&[2.0, -2.0, 1.0, -1.0]);
        let out = repetition_penalty(&s, &[&[0, 1, 1]], 2.0).unwrap();
        assert_eq!(vec(&out), vec![1.0, -4.0, 1.0, -1.0]);
    }

    #[test]
    fn repetition_penalty_handles_rows_of_different_lengths() {
        let s = Tensor::from_slice(&[2.0f32, 2.0, 2.0, 2.0, 2.0, 2.0]).view([2, 3]);
        let out = repetition_penalty(&s, &[&[2], &[0, 1]], 2.0).unwrap();
        assert_eq!(vec(&out), vec![2.0, 2.0, 1.0, 1.0, 1.0, 2.0]);
    }

    #[test]
    fn ngram_blocking_bans_the_token_that_would_repeat_an_ngram() {
        // history 5 6 7 5 6: the bigram "6 x" already saw x=7, trigram "5 6 x" saw 7.
        assert_eq!(banned_ngram_tokens(&[5, 6, 7, 5, 6], 2), vec![7]);
        assert_eq!(banned_ngram_tokens(&[5, 6, 7, 5, 6], 3), vec![7]);
        assert_eq!(banned_ngram_tokens(&[5, 6, 7, 5, 6], 4), Vec::<i64>::new());
        assert_eq!(banned_ngram_tokens(&[1, 1, 1], 1), vec![1, 1, 1]);
        assert_eq!(banned_ngram_tokens(&[1], 3), Vec::<i64>::new());
    }

    #[test]
    fn min_new_tokens_masks_eos_until_reached() {
        let p = Processors {
            min_new_tokens: 2,
            eos: Some(1),
            ..Default::default()
        };
        let s = row(&[0.0, 9.0, 1.0]);
        assert_eq!(vec(&p.apply(s.copy(), &[&[0]], 1).unwrap())[1], f32::NEG_INFINITY);
        assert_eq!(vec(&p.apply(s, &[&[0]], 2).unwrap())[1], 9.0);
    }

    #[test]
    fn top_k_keeps_k_best() {
        let out = vec(&top_k(&row(&[1.0, 4.0, 3.0, 2.0]), 2).unwrap());
        assert_eq!(out, vec![f32::NEG_INFINITY, 4.0, 3.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_the_mass() {
        // probabilities 0.5, 0.3, 0.2 (as logits of their logs)
        let logits: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        let keep = |p: f64| -> Vec<bool> {
            vec(&top_p(&row(&logits), p).unwrap())
                .iter()
                .map(|v| v.is_finite())
                .collect()
        };
        assert_eq!(keep(0.4), vec![true, false, false]);
        assert_eq!(keep(0.6), vec![true, true, false]);
        assert_eq!(keep(0.85), vec![true, true, true]);
        assert_eq!(keep(0.01), vec![true, false, false]);
    }

    #[test]
    fn typical_p_keeps_at_least_one_token() {
        let out = vec(&typical_p(&row(&[5.0, 0.0, -5.0]), 0.01).unwrap());
        assert!(out.iter().filter(|v| v.is_finite()).count() >= 1);
    }
}
