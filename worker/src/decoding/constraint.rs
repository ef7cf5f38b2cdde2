//! A constrained sequence's grammar state, and the step's token masks for every constrained row at once.
//!
//! A mask depends on the token the row picked last, so it is computed between that pick and the next one.
//! llguidance moves its parser past a token and computes a mask in tens of microseconds to a millisecond
//! each; the scheduler does both for the batch's rows in parallel (rayon) while the forward pass runs
//! ([`Constraint::refresh_all`] on another thread), so on a GPU they cost no step time: a pick only notes its
//! token ([`Constraint::advance`]), and the next refresh consumes it. The masks reach the device as packed
//! bits (6 KB a row for a 50k vocabulary, not 50 KB of booleans), unpacked and applied there with the other
//! logits processors ([`apply_masks`]): one upload a step for every constrained row together, no readback.
//! On the CPU the scores are on the host already, and the bits are applied to them there.

use rayon::prelude::*;
use shared::grammar::Matcher;
use tch::{Device, Kind, Tensor};

use super::error::{DecodeError, Result};

/// A sequence's grammar: where it stands after the tokens generated so far, and the tokens it allows next.
pub struct Constraint {
    matcher: Matcher,
    /// The vocabulary's end of text, which a complete grammar allows.
    eos: Option<u32>,
    /// The allowed next tokens as bits (32 a word, token `t` is bit `t % 32` of word `t / 32`); `None`
    /// until computed for the current position.
    mask: Option<Vec<u32>>,
    /// Tokens generated that the parser has not consumed yet: the next [`refresh`](Self::refresh) consumes
    /// them, off the engine's critical path.
    pending: Vec<u32>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("mask_ready", &self.mask.is_some())
            .finish_non_exhaustive()
    }
}

impl Clone for Constraint {
    /// An independent copy of the grammar's state (beam search forks a beam's state).
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            eos: self.eos,
            mask: self.mask.clone(),
            pending: self.pending.clone(),
        }
    }
}

impl Constraint {
    pub fn new(matcher: Matcher) -> Self {
        let eos = matcher.tok_env().ok().map(|env| env.tok_trie().eos_token());
        Self {
            matcher,
            eos,
            mask: None,
            pending: Vec::new(),
        }
    }

    /// Notes a generated token, which the next [`refresh`](Self::refresh) consumes. A token the mask did not
    /// allow (which masking prevents) fails the sequence there rather than let it continue outside its
    /// grammar; the end of text, which ends the sequence, is checked at once.
    pub fn advance(&mut self, token: i64) -> Result<()> {
        self.mask = None;
        let token =
            u32::try_from(token).map_err(|_| grammar_error(format!("token {token} is not a token id")))?;
        if Some(token) == self.eos {
            // The end of text is not part of the grammar's language: the mask allowed it because the text
            // is complete here, and it ends the sequence.
            self.consume_pending()?;
            return if self.matcher.is_error() {
                Err(grammar_error(self.matcher.get_error().unwrap_or_default()))
            } else {
                Ok(())
            };
        }
        self.pending.push(token);
        Ok(())
    }

    fn consume_pending(&mut self) -> Result<()> {
        for token in std::mem::take(&mut self.pending) {
            self.matcher
                .consume_token(token)
                .map_err(|e| grammar_error(format!("token {token} does not fit the grammar: {e}")))?;
        }
        Ok(())
    }

    /// Consumes the tokens generated since the last refresh, then computes the next mask if the position
    /// changed since the last.
    pub fn refresh(&mut self) -> Result<()> {
        self.consume_pending()?;
        if self.mask.is_none() {
            let mask = self
                .matcher
                .compute_mask_or_eos()
                .map_err(|e| grammar_error(format!("the grammar's next tokens: {e}")))?;
            self.mask = Some(mask.as_slice().to_vec());
        }
        Ok(())
    }

    /// Refreshes every mask, in parallel; each sequence gets its own result.
    pub fn refresh_all(constraints: &mut [&mut Constraint]) -> Vec<Result<()>> {
        constraints.par_iter_mut().map(|c| c.refresh()).collect()
    }

    /// The mask for the next pick, once [`refresh`](Self::refresh)ed.
    pub fn mask(&self) -> Option<&[u32]> {
        self.mask.as_deref()
    }
}

fn grammar_error(message: String) -> DecodeError {
    DecodeError::Invalid(format!("constrained decoding: {message}"))
}

/// Whether a refresh was owed but could not run (its thread panicked): every sequence gets the error.
pub(crate) fn lost(n: usize, why: &str) -> Vec<Result<()>> {
    (0..n).map(|_| Err(grammar_error(why.to_owned()))).collect()
}

/// Sets to -inf every score a row's mask disallows; `masks[r]` is row `r`'s packed mask, `None` for an
/// unconstrained row (left unchanged). On an accelerator, one upload of the packed bits, unpacked there.
pub(crate) fn apply_masks(scores: Tensor, masks: &[Option<&[u32]>]) -> Result<Tensor> {
    let Some(words) = masks.iter().flatten().map(|m| m.len()).max() else {
        return Ok(scores);
    };
    let device = scores.device();
    let vocab = scores.size().last().copied().unwrap_or(0);
    if (words as i64) * 32 < vocab {
        return Err(grammar_error(format!(
            "a mask covers {} tokens; the model has {vocab}",
            words * 32
        )));
    }
    if device == Device::Cpu {
        apply_on_host(scores, masks, vocab)
    } else {
        unpack_on_device(scores, masks, words, vocab)
    }
}

thread_local! {
    /// The host path's copy of the batch's scores, kept from step to step: a fresh 6 MB buffer a step is
    /// mostly page faults.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// On the host the scores are copied out, every disallowed one set to -inf (a mask word's clear bits only,
/// so a word whose 32 tokens are all allowed costs one comparison), and copied back: two copies of the
/// batch's scores, where unpacking the bits into booleans for libtorch's `masked_fill` took several times as
/// long on one thread.
fn apply_on_host(scores: Tensor, masks: &[Option<&[u32]>], vocab: i64) -> Result<Tensor> {
    let shape = scores.size();
    let flat = scores.f_to_kind(Kind::Float)?.f_contiguous()?;
    let numel = flat.numel();
    let vocab = vocab as usize;
    SCORES.with_borrow_mut(|values| {
        values.resize(numel, 0.0);
        flat.f_copy_data(values, numel)?;
        for (m, row) in masks.iter().zip(values.chunks_mut(vocab)) {
            let Some(m) = m else { continue };
            for (w, tokens) in row.chunks_mut(32).enumerate() {
                let mut disallowed = !m.get(w).copied().unwrap_or(0);
                while disallowed != 0 {
                    let bit = disallowed.trailing_zeros() as usize;
                    if let Some(score) = tokens.get_mut(bit) {
                        *score = f32::NEG_INFINITY;
                    }
                    disallowed &= disallowed - 1;
                }
            }
        }
        Ok(Tensor::f_from_slice(values)?.f_view(shape.as_slice())?)
    })
}

/// The packed bits uploaded once and unpacked by the device: a 50k vocabulary's mask is 6 KB a row.
fn unpack_on_device(scores: Tensor, masks: &[Option<&[u32]>], words: usize, vocab: i64) -> Result<Tensor> {
    let device = scores.device();
    // Unconstrained rows allow everything (all bits set).
    let mut packed: Vec<i32> = Vec::with_capacity(masks.len() * words);
    for m in masks {
        match m {
            Some(m) => {
                packed.extend(m.iter().map(|&w| w as i32));
                packed.extend(std::iter::repeat_n(0, words - m.len()));
            }
            None => packed.extend(std::iter::repeat_n(-1i32, words)),
        }
    }
    let bits = Tensor::f_from_slice(&packed)?
        .f_view([masks.len() as i64, words as i64, 1])?
        .f_to_device(device)?;
    let shifts = Tensor::f_arange(32, (Kind::Int, device))?;
    let allowed = bits
        .f_bitwise_right_shift(&shifts)?
        .f_bitwise_and(1)?
        .f_view([masks.len() as i64, words as i64 * 32])?
        .f_narrow(1, 0, vocab)?
        .f_eq(0)?;
    Ok(scores.f_masked_fill(&allowed, f64::NEG_INFINITY)?)
}

/// Whether `mask` allows `token`.
#[cfg(test)]
pub(crate) fn allowed(mask: &[u32], token: usize) -> bool {
    mask.get(token / 32).is_some_and(|w| w >> (token % 32) & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoding::tensors::to_vec_f32;

    #[test]
    fn masks_unpack_bit_for_bit_on_the_device_and_on_the_host() {
        let vocab = 70usize;
        let scores =
            Tensor::from_slice(&(0..3 * vocab).map(|i| i as f32).collect::<Vec<_>>()).view([3, vocab as i64]);
        // Row 0: tokens 1, 31, 32, 69; row 1 unconstrained; row 2: only token 0.
        let mut a = vec![0u32; 3];
        for t in [1usize, 31, 32, 69] {
            a[t / 32] |= 1 << (t % 32);
        }
        let b = vec![1u32, 0, 0];
        let masks = [Some(a.as_slice()), None, Some(b.as_slice())];
        for out in [
            unpack_on_device(scores.shallow_clone(), &masks, 3, vocab as i64).unwrap(),
            apply_on_host(scores.shallow_clone(), &masks, vocab as i64).unwrap(),
        ] {
            let out = to_vec_f32(&out.view([-1])).unwrap();
            let row = |r: usize| &out[r * vocab..(r + 1) * vocab];
            for t in 0..vocab {
                assert_eq!(row(0)[t].is_finite(), allowed(&a, t), "row 0 token {t}");
                assert_eq!(row(1)[t], (vocab + t) as f32);
                assert_eq!(row(2)[t].is_finite(), t == 0);
            }
            assert_eq!(row(0)[69], 69.0, "allowed scores are untouched");
        }
    }

    #[test]
    fn no_mask_leaves_the_scores_as_they_are() {
        let scores = Tensor::from_slice(&[1.0f32, 2.0]).view([1, 2]);
        let out = apply_masks(scores.shallow_clone(), &[None]).unwrap();
        assert!(out.equal(&scores));
    }

    #[test]
    fn a_mask_too_short_for_the_vocabulary_is_an_error() {
        let scores = Tensor::zeros([1, 70], (Kind::Float, Device::Cpu));
        assert!(apply_masks(scores, &[Some(&[1u32, 2])]).is_err());
    }
}
