//! Bookkeeping for strategies that extend every prompt by one token per step (greedy, sampling,
//! contrastive): left padding, attention masks and position ids, and when each prompt is done.
//!
//! Prompts of different lengths share one KV cache by left padding: the shorter ones get leading pad
//! positions that the attention mask hides, and position ids count only real tokens, so each prompt sees
//! exactly what it would see alone (transformers' GPT-J `prepare_inputs_for_generation` does the same). A
//! prompt that finishes leaves the batch: its cache rows are dropped and the rest run on.

use super::stop::{StopChecker, TextDecoder};
use super::{Decoded, Result, i64_tensor};
use shared::FinishReason;
use tch::{Device, Tensor};

pub(crate) struct Rows {
    /// Prompt then generated tokens, per prompt.
    pub tokens: Vec<Vec<i64>>,
    prompt_len: Vec<usize>,
    /// Left padding of each prompt in the cache.
    pad: Vec<usize>,
    /// Cache length after the prefill.
    padded_len: usize,
    done: Vec<Option<Decoded>>,
    /// Prompt index of each batch row still running.
    pub active: Vec<usize>,
    /// Tokens generated so far by every running prompt (they advance together).
    pub generated: usize,
}

/// The inputs of one forward pass.
pub(crate) struct Inputs {
    pub ids: Tensor,
    pub mask: Tensor,
    pub positions: Tensor,
}

impl Rows {
    pub fn new(prompts: &[Vec<i64>]) -> Self {
        let padded_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
        Self {
            tokens: prompts.to_vec(),
            prompt_len: prompts.iter().map(Vec::len).collect(),
            pad: prompts.iter().map(|p| padded_len - p.len()).collect(),
            padded_len,
            done: vec![None; prompts.len()],
            active: (0..prompts.len()).collect(),
            generated: 0,
        }
    }

    /// Left-padded prompts. Pad positions get token 0 and position 1 (transformers' choice; they are masked).
    pub fn prefill(&self) -> Result<Inputs> {
        let (b, l) = (self.active.len(), self.padded_len);
        let mut ids = Vec::with_capacity(b * l);
        let mut mask = Vec::with_capacity(b * l);
        let mut pos = Vec::with_capacity(b * l);
        for &p in &self.active {
            let pad = self.pad[p];
            ids.extend(std::iter::repeat_n(0, pad));
            ids.extend_from_slice(&self.tokens[p]);
            mask.extend(std::iter::repeat_n(0, pad));
            mask.extend(std::iter::repeat_n(1, l - pad));
            pos.extend(std::iter::repeat_n(1, pad));
            pos.extend(0..(l - pad) as i64);
        }
        Ok(Inputs {
            ids: i64_tensor(&ids, b, l, Device::Cpu)?,
            mask: i64_tensor(&mask, b, l, Device::Cpu)?,
            positions: i64_tensor(&pos, b, l, Device::Cpu)?,
        })
    }

    /// The attention mask of the running prompts over a cache of `len` positions.
    pub fn mask(&self, len: usize) -> Result<Tensor> {
        let mut mask = Vec::with_capacity(self.active.len() * len);
        for &p in &self.active {
            let pad = self.pad[p];
            mask.extend(std::iter::repeat_n(0, pad));
            mask.extend(std::iter::repeat_n(1, len - pad));
        }
        i64_tensor(&mask, self.active.len(), len, Device::Cpu)
    }

    /// Inputs feeding each running prompt's newest token.
    pub fn step(&self) -> Result<Inputs> {
        let b = self.active.len();
        let ids: Vec<i64> = self
            .active
            .iter()
            .map(|&p| *self.tokens[p].last().unwrap_or(&0))
            .collect();
        let pos: Vec<i64> = self
            .active
            .iter()
            .map(|&p| self.tokens[p].len() as i64 - 1)
            .collect();
        Ok(Inputs {
            ids: i64_tensor(&ids, b, 1, Device::Cpu)?,
            mask: self.mask(self.cache_len() + 1)?,
            positions: i64_tensor(&pos, b, 1, Device::Cpu)?,
        })
    }

    /// Positions in the cache before the next step's token: the padded prompt plus all but the newest token.
    pub fn cache_len(&self) -> usize {
        self.padded_len + self.generated.saturating_sub(1)
    }

    /// Token histories of the running prompts, in batch order.
    pub fn histories(&self) -> Vec<&[i64]> {
        self.active.iter().map(|&p| self.tokens[p].as_slice()).collect()
    }

    /// Appends one token to every running prompt (in batch order) and marks the ones that are done.
    pub fn push(&mut self, next: &[i64], ctx: &Finish<'_>) {
        self.generated += 1;
        for (&p, &tok) in self.active.iter().zip(next) {
            self.tokens[p].push(tok);
            let generated = &self.tokens[p][self.prompt_len[p]..];
            if let Some((reason, stop)) = ctx.check(generated) {
                self.done[p] = Some(Decoded {
                    tokens: generated.to_vec(),
                    finish_reason: reason,
                    stop,
                });
            }
        }
    }

    /// Drops the finished prompts from the batch; returns the batch rows kept when any left.
    pub fn retain(&mut self) -> Option<Vec<i64>> {
        let keep: Vec<i64> = (0..self.active.len())
            .filter(|&b| self.done[self.active[b]].is_none())
            .map(|b| b as i64)
            .collect();
        if keep.len() == self.active.len() {
            return None;
        }
        self.active.retain(|&p| self.done[p].is_none());
        Some(keep)
    }

    pub fn all_done(&self) -> bool {
        self.active.iter().all(|&p| self.done[p].is_some())
    }

    pub fn into_results(self) -> Vec<Decoded> {
        self.done
            .into_iter()
            .map(|d| {
                d.unwrap_or_else(|| Decoded {
                    tokens: vec![],
                    finish_reason: FinishReason::Length,
                    stop: None,
                })
            })
            .collect()
    }
}

/// When a generated sequence is done: EOS, a stop sequence (once `min_new_tokens` are out), or length.
pub(crate) struct Finish<'a> {
    pub eos: Option<i64>,
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    pub stop: &'a StopChecker,
    pub text: &'a dyn TextDecoder,
}

impl Finish<'_> {
    pub fn check(&self, generated: &[i64]) -> Option<(FinishReason, Option<String>)> {
        let n = generated.len();
        if self.eos.is_some() && generated.last().copied() == self.eos {
            return Some((FinishReason::Eos, None));
        }
        if n >= self.min_new_tokens
            && let Some(s) = self.stop.hit(self.text, generated)
        {
            return Some((FinishReason::Stop, Some(s.to_string())));
        }
        (n >= self.max_new_tokens).then_some((FinishReason::Length, None))
    }
}
