//! Contrastive search (Su et al. 2022), as transformers 4.55.4's `_contrastive_search` runs it and as the
//! original deployment used it (`penalty_alpha` 0.6, `top_k` 4).
//!
//! Each step takes the `top_k` most likely next tokens, runs all of them through the model at once, and
//! keeps the candidate with the best
//! `(1 - alpha) * p(token) - alpha * max cosine(candidate's hidden state, every earlier hidden state)`.
//! The degeneration penalty is what keeps contrastive search from looping.
//!
//! transformers repeats the whole KV cache once per candidate every step. Here the candidates are `top_k`
//! queries of the sequence's one cache row, at the same position, each seeing the sequence's keys and its
//! own key only (not each other's): the step writes `top_k` keys past the sequence's end and keeps the
//! chosen one, so a step costs the candidates' tokens and nothing proportional to the context.

use super::error::{DecodeError, Result};
use super::finish::Decoded;
use super::sequence::{Choice, Common, Context};
use super::tensors::to_vec_i64;
use tch::{Kind, Tensor};

pub(crate) struct Contrastive {
    alpha: f64,
    k: usize,
    /// Unit hidden states of every position so far, `[capacity, n_embd]` float32, written in place; rows
    /// `0..len` are real.
    context: Option<Tensor>,
    len: usize,
    /// This step's candidates: probabilities `[k]` and ids.
    candidates: Option<(Tensor, Vec<i64>)>,
}

impl Contrastive {
    pub fn new(alpha: f64, k: usize) -> Self {
        Self {
            alpha,
            k,
            context: None,
            len: 0,
            candidates: None,
        }
    }

    pub fn top_k(&self) -> usize {
        self.k
    }

    /// Takes the prompt's hidden states (`[prompt, n_embd]`) as the first context; `capacity` bounds the
    /// positions the sequence will reach.
    pub fn start(&mut self, hidden: &Tensor, capacity: usize) -> Result<()> {
        let (p, e) = hidden.size2()?;
        let context = Tensor::f_zeros([capacity as i64, e], (Kind::Float, hidden.device()))?;
        context
            .f_narrow(0, 0, p)?
            .f_copy_(&normalize(&hidden.f_to_kind(Kind::Float)?)?)?;
        self.context = Some(context);
        self.len = p as usize;
        Ok(())
    }

    /// Takes this step's candidates, picked for the whole batch at once ([`super::select`]): their ids,
    /// most likely first, and probabilities `[k]`; they are what the sequence feeds.
    pub fn propose(&mut self, ids: Vec<i64>, probs: Tensor) -> Choice {
        self.candidates = Some((probs, ids.clone()));
        Choice::Feed(ids)
    }
}

/// Contrastive search's pick for every contrastive sequence of a pass at once: one batched similarity of
/// the candidates with each sequence's earlier hidden states, one choice, one readback. `hidden` is
/// `[c, kmax, n_embd]`, sequence `i`'s candidates in its first `k_i` rows. Returns each sequence's chosen
/// candidate, and its result when the chosen token ended it.
pub(crate) fn absorb(
    seqs: &mut [(&mut Contrastive, &mut Common)],
    hidden: &Tensor,
    ctx: &Context<'_>,
) -> Result<Vec<(usize, Option<Decoded>)>> {
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    let mut contexts = Vec::with_capacity(seqs.len());
    let mut probs = Vec::with_capacity(seqs.len());
    for (c, _) in seqs.iter() {
        let context = c
            .context
            .as_ref()
            .ok_or_else(|| DecodeError::Invalid("contrastive search has no context".into()))?;
        if c.len >= context.size()[0] as usize {
            return Err(DecodeError::Invalid(
                "contrastive search ran past its context".into(),
            ));
        }
        contexts.push(context.f_narrow(0, 0, c.len as i64)?);
        let (p, _) = c.candidates.as_ref().ok_or_else(|| {
            DecodeError::Invalid("contrastive search absorbed a pass it did not feed".into())
        })?;
        probs.push(p.shallow_clone());
    }
    let device = contexts[0].device();
    let (n, kmax) = (seqs.len(), hidden.size()[1] as usize);
    let next = normalize(&hidden.f_to_kind(Kind::Float)?.f_to_device(device)?)?; // [c, kmax, e]
    let lens: Vec<usize> = seqs.iter().map(|(c, _)| c.len).collect();
    let longest = lens.iter().copied().max().unwrap_or(0);
    // Each sequence's context, padded to the longest: [c, longest, e].
    let padded = Tensor::f_pad_sequence(&contexts, true, 0.0, "right")?;
    // Degeneration penalty: the highest cosine similarity with any earlier position (padding excluded).
    let cosine = padded.f_bmm(&next.f_transpose(1, 2)?)?; // [c, longest, kmax]
    let past: Vec<bool> = lens
        .iter()
        .flat_map(|&l| (0..longest).map(move |p| p >= l))
        .collect();
    let past = Tensor::f_from_slice(&past)?
        .f_to_device(device)?
        .f_view([n as i64, longest as i64, 1])?;
    let penalty = cosine
        .f_masked_fill(&past, f64::NEG_INFINITY)?
        .f_amax([1i64].as_slice(), false)?; // [c, kmax]
    let probs = Tensor::f_pad_sequence(&probs, true, 0.0, "right")?.f_to_device(device)?; // [c, kmax]
    let column = |v: Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::f_from_slice(&v)?.f_to_device(device)?.f_view([-1, 1])?)
    };
    let keep = column(seqs.iter().map(|(c, _)| (1.0 - c.alpha) as f32).collect())?;
    let alpha = column(seqs.iter().map(|(c, _)| c.alpha as f32).collect())?;
    let score = probs.f_mul(&keep)?.f_sub(&penalty.f_mul(&alpha)?)?;
    // A sequence with fewer candidates than the widest never picks past its own.
    let beyond: Vec<bool> = seqs
        .iter()
        .flat_map(|(c, _)| (0..kmax).map(move |j| j >= c.k))
        .collect();
    let beyond = Tensor::f_from_slice(&beyond)?
        .f_to_device(device)?
        .f_view([n as i64, kmax as i64])?;
    // A constrained sequence never picks a candidate its grammar ruled out (probability 0): with fewer
    // allowed tokens than `top_k`, the top k holds some. Unconstrained ones keep transformers' rule.
    let beyond = if seqs.iter().any(|(_, s)| s.grammar.is_some()) {
        let constrained = column(
            seqs.iter()
                .map(|(_, s)| if s.grammar.is_some() { 1.0 } else { 0.0 })
                .collect(),
        )?
        .f_gt(0.5)?;
        beyond.f_logical_or(&probs.f_le(0.0)?.f_logical_and(&constrained)?)?
    } else {
        beyond
    };
    let chosen = to_vec_i64(
        &score
            .f_masked_fill(&beyond, f64::NEG_INFINITY)?
            .f_argmax(-1, false)?,
    )?;
    let mut out = Vec::with_capacity(n);
    for (i, ((c, seq), &chosen)) in seqs.iter_mut().zip(&chosen).enumerate() {
        let chosen = chosen as usize;
        let (_, ids) = c.candidates.take().ok_or_else(|| {
            DecodeError::Invalid("contrastive search absorbed a pass it did not feed".into())
        })?;
        let context = c
            .context
            .as_ref()
            .ok_or_else(|| DecodeError::Invalid("contrastive search has no context".into()))?;
        context
            .f_narrow(0, c.len as i64, 1)?
            .f_copy_(&next.f_select(0, i as i64)?.f_narrow(0, chosen as i64, 1)?)?;
        c.len += 1;
        out.push((chosen, seq.push(ids[chosen], ctx)?));
    }
    Ok(out)
}

/// Unit vectors along the last dimension.
fn normalize(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_div(&t.f_norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)?)?)
}
