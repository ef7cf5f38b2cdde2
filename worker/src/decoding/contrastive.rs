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

    /// The candidates for the next position, from the last pass's logits (`[1, vocab]`).
    pub fn choose(&mut self, seq: &mut Common, logits: &Tensor) -> Result<Choice> {
        let scores = seq.process(logits.shallow_clone())?;
        let probs = scores.f_softmax(-1, Kind::Float)?;
        let (top_probs, top_ids) = probs.f_topk(self.k as i64, -1, true, true)?;
        let ids = to_vec_i64(&top_ids)?;
        self.candidates = Some((top_probs.f_reshape([-1])?, ids.clone()));
        Ok(Choice::Feed(ids))
    }

    /// Picks a candidate from the pass's hidden states of the candidates (`[k, n_embd]`). Returns the
    /// chosen candidate's index, and the result when its token ended the sequence.
    pub fn absorb(
        &mut self,
        seq: &mut Common,
        hidden: &Tensor,
        ctx: &Context<'_>,
    ) -> Result<(usize, Option<Decoded>)> {
        let (top_probs, ids) = self.candidates.take().ok_or_else(|| {
            DecodeError::Invalid("contrastive search absorbed a pass it did not feed".into())
        })?;
        let context = self
            .context
            .as_ref()
            .ok_or_else(|| DecodeError::Invalid("contrastive search has no context".into()))?;
        let next = normalize(&hidden.f_to_kind(Kind::Float)?.f_to_device(context.device())?)?; // [k, e]
        // Degeneration penalty: the highest cosine similarity with any earlier position.
        let cosine = context
            .f_narrow(0, 0, self.len as i64)?
            .f_matmul(&next.f_transpose(0, 1)?)?; // [len, k]
        let penalty = cosine.f_amax([0i64].as_slice(), false)?; // [k]
        let score = top_probs
            .f_to_device(penalty.device())?
            .f_mul_scalar(1.0 - self.alpha)?
            .f_sub(&penalty.f_mul_scalar(self.alpha)?)?;
        let chosen = to_vec_i64(&score.f_argmax(-1, false)?)?[0] as usize;
        if self.len >= context.size()[0] as usize {
            return Err(DecodeError::Invalid(
                "contrastive search ran past its context".into(),
            ));
        }
        context
            .f_narrow(0, self.len as i64, 1)?
            .f_copy_(&next.f_narrow(0, chosen as i64, 1)?)?;
        self.len += 1;
        Ok((chosen, seq.push(ids[chosen], ctx)))
    }
}

/// Unit vectors along the last dimension.
fn normalize(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_div(&t.f_norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)?)?)
}
