//! Token selection over the whole batch: every greedy and sampling row of a step picks its next token, and
//! every contrastive row its `top_k` candidates, in one set of tensor operations and one device→host
//! readback, whatever mix of logits processors and warpers the rows ask for.
//!
//! On a GPU a decode step of a 6B model takes ~12 ms; selecting tokens row by row (an argmax and a readback
//! each, or a whole 50k-float row read back to sample on the host) would cost more than the model. So each
//! processor runs once over all rows with per-row parameters, chosen so that a row that does not use it is
//! left bit-for-bit unchanged (a penalty of 1, a temperature of 1, no threshold), and a row's scores go
//! through exactly the arithmetic of transformers' processor on that row alone: a row gets the same token
//! in a batch of one or of a hundred.
//!
//! Sampling draws on the device by inverse CDF: the row's own seeded generator draws one uniform on the
//! host (the same draw [`super::sample::draw`] makes), and the token is the first whose cumulative
//! probability, summed in float64 as the host draw sums it, exceeds the uniform times the total. A seeded
//! job's text does not depend on its batch, its device or this change.

use super::constraint::apply_masks;
use super::error::Result;
use super::processors::{self, Processors, banned_ngram_tokens};
use super::sample::Sampler;
use super::tensors::{i64_tensor, to_vec_i64, top_k};
use shared::{TokenLogprob, TopLogprob};
use tch::{Kind, Tensor};

/// What one row needs to pick its token.
pub(crate) struct Row<'a> {
    /// The prompt, then the tokens generated so far.
    pub history: &'a [i64],
    pub generated: usize,
    pub processors: &'a Processors,
    /// Sampling's warpers and this step's uniform in `[0, 1)`; `None` for greedy.
    pub sample: Option<(&'a Sampler, f64)>,
    /// Contrastive search's `top_k`: the row wants its `k` most likely tokens and their probabilities
    /// (after the processors, no warper), not a pick.
    pub candidates: Option<usize>,
    /// The row's grammar mask for this pick (packed bits, [`super::constraint`]); `None` when unconstrained.
    pub mask: Option<&'a [u32]>,
    /// A pick row wants its token's log-probability and this many likeliest alternatives.
    pub logprobs: Option<usize>,
}

/// What a batch selection gives each row, in the order of the rows.
pub(crate) enum Selected {
    /// A greedy or sampling row's next token, and its log-probability when the row asked.
    Token(i64, Option<TokenLogprob>),
    /// A contrastive row's candidates, most likely first, and their probabilities `[k]` (on the device).
    Candidates(Vec<i64>, Tensor),
}

/// Every row's selection from `logits` (`[rows.len(), vocab]`), with one readback.
///
/// Sampling rows that all have a top-k draw from a window of their likeliest tokens rather than the whole
/// vocabulary ([`Window`]); in the rare step where ties make what a row keeps overflow its window, the
/// selection runs again over the whole vocabulary (a second readback), so the token is the same either way.
pub(crate) fn select(logits: &Tensor, rows: &[Row<'_>]) -> Result<Vec<Selected>> {
    match select_with(logits, rows, true)? {
        Some(selected) => Ok(selected),
        None => Ok(select_with(logits, rows, false)?.unwrap_or_default()),
    }
}

/// [`select`], drawing from windows when `windows` allows; `None` when a window did not hold what its row
/// keeps.
fn select_with(logits: &Tensor, rows: &[Row<'_>], windows: bool) -> Result<Option<Vec<Selected>>> {
    if rows.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let device = logits.device();
    let raw = logits.f_to_kind(Kind::Float)?;
    let scores = process(raw.shallow_clone(), rows)?;
    let greedy = scores.f_argmax(-1, false)?;
    // Whether each sampling row's window held every token it keeps (when they drew from windows).
    let mut held: Option<Tensor> = None;
    // Sampling rows are warped and drawn apart from the others: the warpers and the draw cost several
    // passes over the vocabulary, which greedy rows do not need.
    let sampling: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].sample.is_some()).collect();
    let next = if sampling.is_empty() {
        greedy
    } else {
        let at = Tensor::f_from_slice(&sampling.iter().map(|&i| i as i64).collect::<Vec<_>>())?
            .f_to_device(device)?;
        let subset: Vec<&Row<'_>> = sampling.iter().map(|&i| &rows[i]).collect();
        let mine = if sampling.len() == rows.len() {
            scores.shallow_clone()
        } else {
            scores.f_index_select(0, &at)?
        };
        let (warped, window) = warp(&mine, &subset, windows)?;
        let sampled = match &window {
            Some(w) => {
                held = Some(w.holds.shallow_clone());
                w.sample(&warped, &subset)?
            }
            None => sample(&warped, &subset)?,
        };
        greedy.f_index_copy(0, &at, &sampled)?
    };
    // Contrastive rows: one top-k at the largest k (its first k of a row are that row's own top k).
    let contrastive: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].candidates.is_some())
        .collect();
    let kmax = contrastive
        .iter()
        .filter_map(|&i| rows[i].candidates)
        .max()
        .unwrap_or(0) as i64;
    // Every part read back in one int64 tensor: the picks, contrastive candidates, log-probabilities.
    let mut parts = vec![next.shallow_clone()];
    let top = if contrastive.is_empty() {
        None
    } else {
        let at = Tensor::f_from_slice(&contrastive.iter().map(|&i| i as i64).collect::<Vec<_>>())?
            .f_to_device(device)?;
        let probs = scores.f_index_select(0, &at)?.f_softmax(-1, Kind::Float)?;
        let (top_probs, top_ids) = probs.f_topk(kmax, -1, true, true)?;
        parts.push(top_ids.f_reshape([-1])?);
        Some(top_probs)
    };
    let scored: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].logprobs.is_some() && rows[i].candidates.is_none())
        .collect();
    let alternatives = scored.iter().filter_map(|&i| rows[i].logprobs).max().unwrap_or(0);
    if !scored.is_empty() {
        parts.extend(logprob_parts(&raw, &next, &scored, alternatives)?);
    }
    let windows = held.as_ref().map_or(0, |h| h.size()[0] as usize);
    if let Some(h) = &held {
        parts.push(h.f_to_kind(Kind::Int64)?);
    }
    let readback = to_vec_i64(&Tensor::f_cat(&parts, 0)?)?;
    let (readback, held) = readback.split_at(readback.len() - windows);
    if held.contains(&0) {
        return Ok(None);
    }
    let (tokens, rest) = readback.split_at(rows.len());
    let (ids, rest) = rest.split_at(contrastive.len() * kmax as usize);
    let mut scores_of = unpack_logprobs(rest, &scored, alternatives, rows.len(), tokens);
    let mut out = Vec::with_capacity(rows.len());
    let mut c = 0;
    for (i, row) in rows.iter().enumerate() {
        match (row.candidates, &top) {
            (Some(k), Some(top_probs)) => {
                let mine = &ids[c * kmax as usize..][..k];
                out.push(Selected::Candidates(
                    mine.to_vec(),
                    top_probs.f_select(0, c as i64)?.f_narrow(0, 0, k as i64)?,
                ));
                c += 1;
            }
            _ => out.push(Selected::Token(
                tokens[i],
                scores_of[i].take().map(|mut lp| {
                    lp.top.truncate(row.logprobs.unwrap_or(0));
                    lp
                }),
            )),
        }
    }
    Ok(Some(out))
}

/// The log-probabilities of the `scored` rows' picks (`next`) under the raw distribution (`raw`'s
/// log-softmax, before any processor), and each row's `alternatives` likeliest tokens, as int64 parts of the
/// step's one readback: the floats' bits, then the alternatives' ids.
fn logprob_parts(raw: &Tensor, next: &Tensor, scored: &[usize], alternatives: usize) -> Result<Vec<Tensor>> {
    let at = Tensor::f_from_slice(&scored.iter().map(|&i| i as i64).collect::<Vec<_>>())?
        .f_to_device(raw.device())?;
    // One log-softmax kernel over the vocabulary: libtorch's logsumexp is several passes (max, exp, sum,
    // log), and took twice as long on one CPU thread; the alternatives are its top values.
    let logprobs = if scored.len() == raw.size()[0] as usize {
        raw.shallow_clone()
    } else {
        raw.f_index_select(0, &at)?
    }
    .f_log_softmax(-1, Kind::Float)?;
    let picked = logprobs
        .f_gather(1, &next.f_index_select(0, &at)?.f_unsqueeze(1)?, false)?
        .f_reshape([-1])?;
    let bits = |t: &Tensor| -> Result<Tensor> {
        Ok(t.f_contiguous()?
            .f_view_dtype(Kind::Int)?
            .f_to_kind(Kind::Int64)?
            .f_reshape([-1])?)
    };
    let mut parts = vec![bits(&picked)?];
    if alternatives > 0 {
        let (values, ids) = top_k(&logprobs, alternatives as i64)?;
        parts.push(bits(&values)?);
        parts.push(ids.f_reshape([-1])?);
    }
    Ok(parts)
}

/// Each row's [`TokenLogprob`] from the readback's log-probability part (`None` for rows not scored).
fn unpack_logprobs(
    part: &[i64],
    scored: &[usize],
    alternatives: usize,
    rows: usize,
    tokens: &[i64],
) -> Vec<Option<TokenLogprob>> {
    let float = |v: i64| f32::from_bits(v as i32 as u32);
    let m = scored.len();
    let (picked, rest) = part.split_at(m.min(part.len()));
    let (values, ids) = rest.split_at((m * alternatives).min(rest.len()));
    let mut out: Vec<Option<TokenLogprob>> = vec![None; rows];
    for (j, &i) in scored.iter().enumerate() {
        let top = (0..alternatives)
            .filter_map(|k| {
                Some(TopLogprob {
                    id: *ids.get(j * alternatives + k)? as u32,
                    logprob: float(*values.get(j * alternatives + k)?),
                })
            })
            .collect();
        out[i] = Some(TokenLogprob {
            id: tokens[i] as u32,
            logprob: picked.get(j).map(|&v| float(v)),
            top,
        });
    }
    out
}

/// The processors every strategy applies (transformers' order): repetition penalty, n-gram blocking,
/// `min_new_tokens` masking EOS; then each constrained row's grammar mask.
fn process(scores: Tensor, rows: &[Row<'_>]) -> Result<Tensor> {
    let device = scores.device();
    let mut scores = scores;
    if rows.iter().any(|r| r.processors.repetition_penalty.is_some()) {
        // Rows are padded with their own first token (a duplicate index writes the same value twice); a
        // row without a penalty is gathered and written back unchanged (× 1, ÷ 1).
        let width = rows
            .iter()
            .filter(|r| r.processors.repetition_penalty.is_some())
            .map(|r| r.history.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut idx = Vec::with_capacity(rows.len() * width);
        let mut penalty = Vec::with_capacity(rows.len());
        for r in rows {
            let h = if r.processors.repetition_penalty.is_some() {
                r.history
            } else {
                &r.history[..r.history.len().min(1)]
            };
            let fill = h.first().copied().unwrap_or(0);
            idx.extend_from_slice(h);
            idx.extend(std::iter::repeat_n(fill, width - h.len()));
            penalty.push(r.processors.repetition_penalty.unwrap_or(1.0) as f32);
        }
        let idx = i64_tensor(&idx, rows.len(), width, device)?;
        let penalty = Tensor::f_from_slice(&penalty)?
            .f_to_device(device)?
            .f_view([-1, 1])?;
        let score = scores.f_gather(1, &idx, false)?;
        let penalised = score
            .f_mul(&penalty)?
            .f_where_self(&score.f_lt(0.0)?, &score.f_div(&penalty)?)?;
        scores = scores.f_scatter(1, &idx, &penalised)?;
    }
    // N-gram bans and EOS before `min_new_tokens`: one masked write of every (row, token) pair.
    let (mut at_rows, mut at_tokens) = (Vec::new(), Vec::new());
    for (i, r) in rows.iter().enumerate() {
        if let Some(n) = r.processors.no_repeat_ngram_size {
            for t in banned_ngram_tokens(r.history, n) {
                at_rows.push(i as i64);
                at_tokens.push(t);
            }
        }
        if let Some(eos) = r.processors.eos
            && r.generated < r.processors.min_new_tokens
        {
            at_rows.push(i as i64);
            at_tokens.push(eos);
        }
    }
    if !at_rows.is_empty() {
        let at_rows = Tensor::f_from_slice(&at_rows)?.f_to_device(device)?;
        let at_tokens = Tensor::f_from_slice(&at_tokens)?.f_to_device(device)?;
        let minus_inf = Tensor::f_from_slice(&[f32::NEG_INFINITY])?.f_to_device(device)?;
        scores = scores.f_index_put(&[Some(at_rows), Some(at_tokens)], &minus_inf, false)?;
    }
    if rows.iter().any(|r| r.mask.is_some()) {
        let masks: Vec<Option<&[u32]>> = rows.iter().map(|r| r.mask).collect();
        scores = apply_masks(scores, &masks)?;
    }
    Ok(scores)
}

/// Sampling's warpers over sampling rows, in transformers' order: temperature, top-k, top-p, min-p,
/// typical-p. A row without one of them gets neutral parameters for it and comes out unchanged. When every
/// row has a top-k (and `windows` allows), also each row's [`Window`].
fn warp(scores: &Tensor, rows: &[&Row<'_>], windows: bool) -> Result<(Tensor, Option<Window>)> {
    let device = scores.device();
    let vocab = scores.size().last().copied().unwrap_or(1);
    let per_row = |f: &dyn Fn(&Sampler) -> Option<f64>| -> Option<Vec<Option<f64>>> {
        let v: Vec<Option<f64>> = rows.iter().map(|r| r.sample.and_then(|(s, _)| f(s))).collect();
        v.iter().any(Option::is_some).then_some(v)
    };
    let column = |v: Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::f_from_slice(&v)?.f_to_device(device)?.f_view([-1, 1])?)
    };
    let mut s = scores.shallow_clone();
    let mut window = None;
    if let Some(t) = per_row(&|s| (s.temperature != 1.0).then_some(s.temperature)) {
        s = s.f_div(&column(t.iter().map(|t| t.unwrap_or(1.0) as f32).collect())?)?;
    }
    if let Some(k) = per_row(&|s| s.top_k.map(|k| k as f64)) {
        // The k-th highest score of each row, from one top-k at the largest k; rows without one keep all.
        let ks: Vec<i64> = k
            .iter()
            .map(|k| k.map_or(1, |k| (k as i64).clamp(1, vocab)))
            .collect();
        let kmax = ks.iter().copied().max().unwrap_or(1);
        let width = Window::width(kmax).filter(|&w| windows && w < vocab && k.iter().all(Option::is_some));
        let (values, ids) = s.f_topk(width.unwrap_or(kmax), -1, true, true)?;
        let at = Tensor::f_from_slice(&ks.iter().map(|k| k - 1).collect::<Vec<i64>>())?
            .f_to_device(device)?
            .f_view([-1, 1])?;
        let kth = values.f_gather(1, &at, false)?;
        if let Some(w) = width {
            // Top-k keeps every token scoring at least the k-th: all of them lie in the window unless ties
            // with the k-th run past its end (a row with fewer than k tokens left keeps only those).
            let last = values.f_narrow(1, w - 1, 1)?;
            let holds = last
                .f_lt_tensor(&kth)?
                .f_logical_or(&last.f_eq(f64::NEG_INFINITY)?)?;
            window = Some(Window {
                holds: holds.f_reshape([-1])?,
                ids,
            });
        }
        let keep_all = column(k.iter().map(|k| if k.is_some() { 0.0 } else { 1.0 }).collect())?.f_gt(0.5)?;
        let kth = kth.f_masked_fill(&keep_all, f64::NEG_INFINITY)?;
        s = s.f_masked_fill(&s.f_lt_tensor(&kth)?, f64::NEG_INFINITY)?;
    }
    if let Some(p) = per_row(&|s| s.top_p) {
        // A row without top-p removes nothing (no cumulative mass is below -1).
        let limit = column(p.iter().map(|p| p.map_or(-1.0, |p| (1.0 - p) as f32)).collect())?;
        s = processors::top_p_rows(&s, &limit)?;
    }
    if let Some(p) = per_row(&|s| s.min_p) {
        // A row without min-p removes nothing (no probability is below 0).
        let min_p = column(p.iter().map(|p| p.unwrap_or(0.0) as f32).collect())?;
        s = processors::min_p_rows(&s, &min_p)?;
    }
    if let Some(p) = per_row(&|s| s.typical_p) {
        let mass = column(p.iter().map(|p| p.unwrap_or(1.0) as f32).collect())?;
        let typical = processors::typical_p_rows(&s, &mass)?;
        // Rows without typical-p keep their scores.
        let uses = column(p.iter().map(|p| if p.is_some() { 1.0 } else { 0.0 }).collect())?.f_gt(0.5)?;
        s = typical.f_where_self(&uses, &s)?;
    }
    Ok((s, window))
}

/// The likeliest tokens of each sampling row, wide enough to hold every token its top-k keeps (the later
/// warpers only remove tokens): the draw's cumulative sum, its comparisons and its search run over this
/// window instead of the whole vocabulary (128 entries instead of 50,400 for a top-k of 50).
///
/// The token is the one [`sample`] draws from the whole vocabulary, bit for bit: the probabilities are the
/// same softmax's, and a float64 running sum in token order over the tokens with any probability is the
/// same sum whether or not the tokens without any lie between them (adding zero is exact).
struct Window {
    /// `[rows, width]` token ids, most likely first.
    ids: Tensor,
    /// `[rows]` bool: the window holds every token the row's top-k keeps. When a row's does not (ties with
    /// its k-th token beyond the window's end) the step selects again without windows.
    holds: Tensor,
}

impl Window {
    /// The window for a largest top-k of `k` (up to 1,024): a margin of at least 64 for ties.
    fn width(k: i64) -> Option<i64> {
        (k <= 1024).then(|| (k + 127) / 64 * 64)
    }

    /// One token per row, drawn as [`sample`] draws it, from the row's window.
    fn sample(&self, warped: &Tensor, rows: &[&Row<'_>]) -> Result<Tensor> {
        let device = warped.device();
        let width = self.ids.size().last().copied().unwrap_or(1);
        let probs = warped.f_softmax(-1, Kind::Float)?;
        // The window in token order, and its probabilities.
        let (ids, _) = self.ids.f_sort(-1, false)?;
        let probs = probs.f_gather(1, &ids, false)?;
        let cumulative = probs.f_cumsum(-1, Kind::Double)?;
        let total = cumulative.f_narrow(-1, width - 1, 1)?;
        let target = uniforms(rows, device)?.f_mul(&total)?;
        let first =
            cumulative
                .f_le_tensor(&target)?
                .f_sum_dim_intlist([-1i64].as_slice(), false, Kind::Int64)?;
        // Rounding can leave the target at the total: then the last token with any probability.
        let last_positive = Tensor::f_arange(width, (Kind::Int64, device))?
            .f_mul(&probs.f_gt(0.0)?)?
            .f_amax([-1i64].as_slice(), false)?;
        let at = first.f_minimum(&last_positive)?.f_unsqueeze(1)?;
        Ok(ids.f_gather(1, &at, false)?.f_reshape([-1])?)
    }
}

/// Each row's uniform `[rows, 1]` float64, on `device`.
fn uniforms(rows: &[&Row<'_>], device: tch::Device) -> Result<Tensor> {
    let u: Vec<f64> = rows.iter().map(|r| r.sample.map_or(0.0, |(_, u)| u)).collect();
    Ok(Tensor::f_from_slice(&u)?.f_to_device(device)?.f_view([-1, 1])?)
}

/// One token per sampling row, drawn from the softmax of its warped scores by inverse CDF.
fn sample(warped: &Tensor, rows: &[&Row<'_>]) -> Result<Tensor> {
    let device = warped.device();
    let vocab = warped.size().last().copied().unwrap_or(1);
    let probs = warped.f_softmax(-1, Kind::Float)?;
    let cumulative = probs.f_cumsum(-1, Kind::Double)?;
    let total = cumulative.f_narrow(-1, vocab - 1, 1)?;
    let target = uniforms(rows, device)?.f_mul(&total)?;
    // The first token whose cumulative mass exceeds the target: the count of those that do not.
    let first = cumulative
        .f_le_tensor(&target)?
        .f_sum_dim_intlist([-1i64].as_slice(), false, Kind::Int64)?;
    // Rounding can leave the target at the total: then the last token with any probability, as on the host.
    let positions = Tensor::f_arange(vocab, (Kind::Int64, device))?;
    let last_positive = positions
        .f_mul(&probs.f_gt(0.0)?)?
        .f_amax([-1i64].as_slice(), false)?;
    Ok(first.f_minimum(&last_positive)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoding::sample::draw;
    use crate::decoding::tensors::to_vec_f32;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn sampler(
        top_k: Option<usize>,
        top_p: Option<f64>,
        min_p: Option<f64>,
        typical_p: Option<f64>,
        t: f64,
    ) -> Sampler {
        Sampler {
            temperature: t,
            top_k,
            top_p,
            min_p,
            typical_p,
            seed: Some(1),
        }
    }

    /// The token one row picks through the per-row processors and the host draw with `rng`: the reference.
    fn alone(
        logits: &[f32],
        history: &[i64],
        generated: usize,
        p: &Processors,
        s: Option<&Sampler>,
        rng: &mut ChaCha8Rng,
    ) -> i64 {
        let t = Tensor::from_slice(logits).view([1, -1]);
        let scores = if p.is_noop() {
            t
        } else {
            p.apply(t, &[history], generated).unwrap()
        };
        match s {
            None => to_vec_i64(&scores.argmax(-1, false)).unwrap()[0],
            Some(s) => {
                let probs = to_vec_f32(&s.warp(&scores).unwrap().softmax(-1, Kind::Float)).unwrap();
                draw(&probs, rng) as i64
            }
        }
    }

    fn tokens(selected: Vec<Selected>) -> Vec<i64> {
        selected
            .into_iter()
            .map(|s| match s {
                Selected::Token(t, _) => t,
                Selected::Candidates(..) => panic!("a pick row got candidates"),
            })
            .collect()
    }

    #[test]
    fn contrastive_rows_get_their_own_top_k_beside_picks_in_one_readback() {
        let logits = Tensor::from_slice(&[0.0f32, 3.0, 1.0, 2.0, 5.0, 4.0, 0.5, 0.1]).view([2, 4]);
        let p = Processors::default();
        let rows = [
            Row {
                history: &[0],
                generated: 0,
                processors: &p,
                sample: None,
                candidates: Some(3),
                mask: None,
                logprobs: None,
            },
            Row {
                history: &[0],
                generated: 0,
                processors: &p,
                sample: None,
                candidates: None,
                mask: None,
                logprobs: None,
            },
        ];
        let before = crate::decoding::readbacks();
        let out = select(&logits, &rows).unwrap();
        assert_eq!(crate::decoding::readbacks() - before, 1);
        let Selected::Candidates(ids, probs) = &out[0] else {
            panic!("candidates")
        };
        assert_eq!(ids, &vec![1, 3, 2]);
        let want = Tensor::from_slice(&[0.0f32, 3.0, 1.0, 2.0]).softmax(-1, Kind::Float);
        let want = to_vec_f32(&want.index_select(0, &Tensor::from_slice(&[1i64, 3, 2]))).unwrap();
        assert_eq!(to_vec_f32(probs).unwrap(), want);
        assert!(matches!(out[1], Selected::Token(0, None)));
    }

    fn processors(rep: Option<f64>, ngram: Option<usize>, min_new: usize) -> Processors {
        Processors {
            repetition_penalty: rep,
            no_repeat_ngram_size: ngram,
            min_new_tokens: min_new,
            eos: Some(0),
        }
    }

    proptest! {
        /// Every row of a mixed batch picks what it picks alone, through the per-row processors, warpers and
        /// host draw.
        #[test]
        fn each_row_picks_what_it_picks_alone(
            seed in any::<u64>(),
            rows in prop::collection::vec(
                (
                    prop::option::of(1.0f64..2.0),
                    prop::option::of(1usize..4),
                    0usize..3,
                    prop::option::of((
                        prop::option::of(1usize..8),
                        prop::option::of(0.1f64..0.99),
                        prop::option::of(0.01f64..0.9),
                        prop::option::of(0.2f64..0.99),
                        0.3f64..2.0,
                    )),
                ),
                1..8,
            ),
        ) {
            let vocab = 24usize;
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let logits: Vec<Vec<f32>> = rows.iter().map(|_| (0..vocab).map(|_| rng.random_range(-4.0f32..4.0)).collect()).collect();
            let histories: Vec<Vec<i64>> = rows.iter().map(|_| (0..rng.random_range(1..12)).map(|_| rng.random_range(0..vocab as i64)).collect()).collect();
            let procs: Vec<Processors> = rows.iter().map(|(rep, ngram, min_new, _)| processors(*rep, *ngram, *min_new)).collect();
            let samplers: Vec<Option<Sampler>> = rows.iter().map(|r| r.3.map(|(k, p, min_p, typ, t)| sampler(k, p, min_p, typ, t))).collect();
            picks_as_alone(seed, &logits, &histories, &procs, &samplers)?;
        }
    }

    /// Selects every row of `logits` in one batch, in one readback, and checks that each picks what it picks
    /// alone through the per-row processors, warpers and host draw.
    fn picks_as_alone(
        seed: u64,
        logits: &[Vec<f32>],
        histories: &[Vec<i64>],
        procs: &[Processors],
        samplers: &[Option<Sampler>],
    ) -> std::result::Result<(), TestCaseError> {
        // Each row's generator, twice: one draws the batch's uniform, its twin the reference's.
        let rngs: Vec<ChaCha8Rng> = (0..logits.len())
            .map(|i| ChaCha8Rng::seed_from_u64(seed ^ i as u64))
            .collect();
        let uniforms: Vec<f64> = rngs.iter().map(|r| r.clone().random::<f64>()).collect();
        let batch: Vec<Row<'_>> = (0..logits.len())
            .map(|i| Row {
                history: &histories[i],
                generated: 1,
                processors: &procs[i],
                sample: samplers[i].as_ref().map(|s| (s, uniforms[i])),
                candidates: None,
                mask: None,
                logprobs: None,
            })
            .collect();
        let flat = Tensor::from_slice(&logits.concat()).view([logits.len() as i64, -1]);
        let before = crate::decoding::readbacks();
        let picked = tokens(select(&flat, &batch).unwrap());
        prop_assert_eq!(crate::decoding::readbacks() - before, 1);
        for i in 0..logits.len() {
            let want = alone(
                &logits[i],
                &histories[i],
                1,
                &procs[i],
                samplers[i].as_ref(),
                &mut rngs[i].clone(),
            );
            prop_assert_eq!(picked[i], want, "row {}", i);
        }
        Ok(())
    }

    proptest! {
        /// Sampling rows that all have a top-k draw from windows of their likeliest tokens, and pick exactly
        /// what the whole-vocabulary host draw picks, whatever the other rows' top-k.
        #[test]
        fn rows_drawing_from_windows_pick_what_the_whole_vocabulary_draw_picks(
            seed in any::<u64>(),
            rows in prop::collection::vec(
                (1usize..100, prop::option::of(0.3f64..0.99), prop::option::of(0.01f64..0.5), 0.3f64..2.0, any::<bool>()),
                1..6,
            ),
        ) {
            let vocab = 400usize;
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            // Coarse logits, so ties are common.
            let logits: Vec<Vec<f32>> = rows.iter().map(|_| (0..vocab).map(|_| rng.random_range(-40i32..40) as f32 / 8.0).collect()).collect();
            let histories = vec![vec![1]; rows.len()];
            let procs = vec![Processors::default(); rows.len()];
            let samplers: Vec<Option<Sampler>> = rows.iter().map(|&(k, top_p, min_p, t, greedy)| (!greedy).then(|| sampler(Some(k), top_p, min_p, None, t))).collect();
            picks_as_alone(seed, &logits, &histories, &procs, &samplers)?;
        }
    }

    /// A sampling row with no history to speak of, drawing at `u`.
    fn drawing<'a>(p: &'a Processors, s: &'a Sampler, u: f64) -> Row<'a> {
        Row {
            history: &[1],
            generated: 0,
            processors: p,
            sample: Some((s, u)),
            candidates: None,
            mask: None,
            logprobs: None,
        }
    }

    #[test]
    fn ties_past_the_window_draw_from_the_whole_vocabulary_and_pick_the_same_token() {
        // 300 tokens tie for the top: a top-k of 5 keeps all of them, more than a window holds.
        let vocab = 1000;
        let logits: Vec<f32> = (0..vocab).map(|i| if i % 3 == 0 { 2.0 } else { -1.0 }).collect();
        let s = sampler(Some(5), None, None, None, 1.0);
        let p = Processors::default();
        let mut drawn = Vec::new();
        for u in [0.0, 0.3, 0.61, 0.999] {
            let row = drawing(&p, &s, u);
            let t = tokens(select(&Tensor::from_slice(&logits).view([1, -1]), &[row]).unwrap())[0];
            // The reference: the same uniform through the whole-vocabulary draw.
            let probs = to_vec_f32(
                &s.warp(&Tensor::from_slice(&logits).view([1, -1]))
                    .unwrap()
                    .softmax(-1, Kind::Float),
            )
            .unwrap();
            let total: f64 = probs.iter().map(|&p| p as f64).sum();
            let mut acc = 0.0;
            let want = probs
                .iter()
                .position(|&p| {
                    acc += p as f64;
                    acc > u * total
                })
                .unwrap();
            assert_eq!(t, want as i64, "at {u}");
            drawn.push(t);
        }
        assert!(
            drawn.iter().any(|&t| t > 5 * 3),
            "ties past the first five were drawn: {drawn:?}"
        );
    }

    #[test]
    fn a_row_without_min_p_comes_out_of_the_warpers_bit_for_bit_as_it_went_in() {
        let logits: Vec<f32> = (0..48).map(|i| ((i * 7919) % 97) as f32 / 13.0 - 3.0).collect();
        let scores = Tensor::from_slice(&logits).view([2, 24]);
        let p = Processors::default();
        let with = sampler(None, None, Some(0.3), None, 1.0);
        let without = sampler(None, None, None, None, 1.0);
        let row = |s| Row {
            history: &[1],
            generated: 0,
            processors: &p,
            sample: Some((s, 0.5)),
            candidates: None,
            mask: None,
            logprobs: None,
        };
        let (a, b) = (row(&with), row(&without));
        let warped = to_vec_f32(&warp(&scores, &[&a, &b], true).unwrap().0).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&warped[24..]), bits(&logits[24..]));
        let alone = to_vec_f32(&with.warp(&scores.narrow(0, 0, 1)).unwrap()).unwrap();
        assert_eq!(bits(&warped[..24]), bits(&alone));
        assert!(
            warped[..24].iter().any(|v| v.is_infinite()),
            "min-p removed something"
        );
    }

    #[test]
    fn a_token_without_probability_is_never_drawn_even_at_the_top_of_the_range() {
        let s = sampler(Some(2), None, None, None, 1.0);
        let logits = Tensor::from_slice(&[1.0f32, 5.0, 4.0, -1.0]).view([1, -1]);
        let p = Processors::default();
        for u in [0.0, 0.5, 0.999_999_999_999] {
            let row = drawing(&p, &s, u);
            let t = tokens(select(&logits, &[row]).unwrap())[0];
            assert!(t == 1 || t == 2, "{t} at {u}");
        }
    }
}
