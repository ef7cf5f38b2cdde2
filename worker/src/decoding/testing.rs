//! A small deterministic [`CausalLm`] for testing strategies without a real model.
//!
//! Its logits are a pseudo-random function of the *whole* token history (masked positions excluded), and
//! its cache keeps that history, so a strategy that mixes up cache rows, masks or positions gets different
//! tokens. [`HashLm::logits_for`] gives the same function without a cache, for reference implementations.

use crate::lm::{CausalLm, KvCache, Logits, ModelInfo, SlotCache, SlotStep, StepOutput};
use tch::{Device, Kind, Tensor};

pub struct HashLm {
    info: ModelInfo,
    /// How strongly EOS is preferred (added to its logit).
    pub eos_bias: f32,
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ceb9fe1a85ec53);
    x ^ (x >> 33)
}

impl HashLm {
    pub fn new(vocab: usize, eos: Option<i64>) -> Self {
        Self {
            info: ModelInfo {
                vocab_size: vocab,
                n_positions: 512,
                n_embd: 8,
                n_layer: 1,
                bos_token_id: eos,
                eos_token_id: eos,
            },
            eos_bias: 0.0,
        }
    }

    fn hash(history: &[i64]) -> u64 {
        history
            .iter()
            .fold(0x9e3779b97f4a7c15, |h, &t| mix(h ^ (t as u64 + 1)))
    }

    /// Next-token logits after `history`.
    pub fn logits_for(&self, history: &[i64]) -> Vec<f32> {
        let h = Self::hash(history);
        (0..self.info.vocab_size)
            .map(|v| {
                let r = mix(h ^ mix(v as u64 + 7)) >> 40; // 24 random bits
                let mut x = (r as f32 / (1u64 << 24) as f32) * 8.0 - 4.0;
                if Some(v as i64) == self.info.eos_token_id {
                    x += self.eos_bias;
                }
                x
            })
            .collect()
    }

    /// The "hidden state" after `history`: depends on the last token mostly, so that repeats look similar.
    pub fn hidden_for(&self, history: &[i64]) -> Vec<f32> {
        let last = history.last().copied().unwrap_or(0) as u64;
        let h = Self::hash(history);
        (0..self.info.n_embd as u64)
            .map(|d| {
                let a = (mix(last * 131 + d) >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let b = (mix(h ^ d) >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                a + 0.3 * b
            })
            .collect()
    }
}

impl CausalLm for HashLm {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn output_device(&self) -> Device {
        Device::Cpu
    }

    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
        logits: Logits,
        output_hidden: bool,
    ) -> Result<StepOutput, tch::TchError> {
        let (b, s) = (input_ids.size()[0], input_ids.size()[1]);
        let past = cache.seq_len() as i64;
        assert_eq!(
            attention_mask.size(),
            vec![b, past + s],
            "mask covers cache and input"
        );
        assert_eq!(position_ids.size(), vec![b, s]);
        // The cache holds token ids (key) and the mask (value), `[b, 1, seq, 1]` as float.
        let new_k = input_ids.to_kind(Kind::Float).view([b, 1, s, 1]);
        let new_v = attention_mask
            .narrow(1, past, s)
            .to_kind(Kind::Float)
            .view([b, 1, s, 1]);
        let (k, v) = match cache.layer(0) {
            Some((k, v)) => (Tensor::cat(&[k, &new_k], 2), Tensor::cat(&[v, &new_v], 2)),
            None => (new_k, new_v),
        };
        // The mask the caller passes must agree with what the cache recorded.
        let recorded: Vec<i64> =
            Vec::try_from(v.view([b, -1]).to_kind(Kind::Int64).reshape([-1])).unwrap_or_default();
        let given: Vec<i64> =
            Vec::try_from(attention_mask.reshape([-1]).to_kind(Kind::Int64)).unwrap_or_default();
        assert_eq!(recorded, given, "attention mask disagrees with the cache");
        let tokens: Vec<i64> =
            Vec::try_from(k.view([b, -1]).to_kind(Kind::Int64).reshape([-1])).unwrap_or_default();
        let positions: Vec<i64> = Vec::try_from(position_ids.reshape([-1])).unwrap_or_default();
        let total = (past + s) as usize;
        let mut out_logits = Vec::new();
        let mut out_hidden = Vec::new();
        let first = match logits {
            Logits::All => 0,
            Logits::LastOnly | Logits::None => s as usize - 1,
        };
        for row in 0..b as usize {
            let toks = &tokens[row * total..(row + 1) * total];
            let mask = &given[row * total..(row + 1) * total];
            let real: Vec<(usize, i64)> = (0..total)
                .filter(|&i| mask[i] == 1)
                .map(|i| (i, toks[i]))
                .collect();
            for j in 0..s as usize {
                let abs = past as usize + j;
                let history: Vec<i64> = real.iter().filter(|(i, _)| *i <= abs).map(|(_, t)| *t).collect();
                if mask[abs] == 1 {
                    assert_eq!(
                        positions[row * s as usize + j],
                        history.len() as i64 - 1,
                        "position ids"
                    );
                }
                if j >= first {
                    out_logits.extend(self.logits_for(&history));
                }
                out_hidden.extend(self.hidden_for(&history));
            }
        }
        cache.set_layer(0, k, v);
        let n = s - first as i64;
        Ok(StepOutput {
            logits: Tensor::from_slice(&out_logits).view([b, n, self.info.vocab_size as i64]),
            hidden: output_hidden
                .then(|| Tensor::from_slice(&out_hidden).view([b, s, self.info.n_embd as i64])),
        })
    }

    fn forward_slots(
        &self,
        step: &SlotStep,
        cache: &mut SlotCache,
        _logits: Logits,
        output_hidden: bool,
    ) -> Result<StepOutput, tch::TchError> {
        Ok(self.slots(step, cache, output_hidden))
    }
}

impl HashLm {
    /// The slot-cache step: tokens are written where the step says, and each query's history is the tokens
    /// at the positions its `visible` row marks, so a wrong mask, start or position gives other logits.
    fn slots(&self, step: &SlotStep, cache: &mut SlotCache, output_hidden: bool) -> StepOutput {
        let (s, q) = (step.starts.len() as i64, step.queries() as i64);
        // The step's new tokens (the grid's, or a packed step's real ones), written where the step says.
        let n = step.ids.numel() as i64;
        let new_k = step.ids.to_kind(Kind::Float).view([n, 1, 1]);
        let new_v = Tensor::ones([n, 1, 1], (Kind::Float, Device::Cpu));
        let index = cache.write_index(1, step, Device::Cpu).expect("index");
        cache.write(0, &new_k, &new_v, &index).expect("write");
        let keys = step.keys();
        let (k, _) = cache.view(0, s as usize, keys).expect("view");
        let tokens: Vec<i64> = Vec::try_from(k.reshape([-1]).to_kind(Kind::Int64)).unwrap_or_default();
        let visible: Vec<bool> = match &step.visible {
            Some(v) => Vec::try_from(v.reshape([-1])).unwrap_or_default(),
            None => vec![true; (s * q) as usize * keys],
        };
        let given: Vec<i64> = Vec::try_from(step.positions.reshape([-1])).unwrap_or_default();
        // Each grid place's position; a packed step's padding places take their row's first token's.
        let positions: Vec<i64> = match &step.packed {
            None => given,
            Some(p) => p.grid.iter().map(|&t| given[t as usize]).collect(),
        };
        let mut out_logits = Vec::new();
        let mut out_hidden = Vec::new();
        for row in 0..s as usize {
            for j in 0..q as usize {
                let seen = &visible[(row * q as usize + j) * keys..][..keys];
                let history: Vec<i64> = (0..keys)
                    .filter(|&i| seen[i])
                    .map(|i| tokens[row * keys + i])
                    .collect();
                let real = step
                    .packed
                    .as_ref()
                    .is_none_or(|p| p.tokens.contains(&((row * q as usize + j) as i64)));
                if real {
                    assert_eq!(
                        positions[row * q as usize + j],
                        history.len() as i64 - 1,
                        "position ids"
                    );
                }
                out_logits.push(self.logits_for(&history));
                out_hidden.push(self.hidden_for(&history));
            }
        }
        // A packed step's outputs are its real tokens', in order.
        let places: Vec<usize> = match &step.packed {
            None => (0..(s * q) as usize).collect(),
            Some(p) => p.tokens.iter().map(|&g| g as usize).collect(),
        };
        let (b, t) = if step.packed.is_some() {
            (1, places.len() as i64)
        } else {
            (s, q)
        };
        let pick = |all: &[Vec<f32>]| places.iter().flat_map(|&g| all[g].clone()).collect::<Vec<f32>>();
        StepOutput {
            logits: Tensor::from_slice(&pick(&out_logits)).view([b, t, self.info.vocab_size as i64]),
            hidden: output_hidden
                .then(|| Tensor::from_slice(&pick(&out_hidden)).view([b, t, self.info.n_embd as i64])),
        }
    }
}

/// Decodes token `t` as the letter `a + t % 26` (so stop strings can be tested).
pub struct Letters;

impl super::stop::TextDecoder for Letters {
    fn decode(&self, ids: &[u32]) -> String {
        ids.iter().map(|&i| (b'a' + (i % 26) as u8) as char).collect()
    }
}
