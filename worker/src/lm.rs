//! The seam between the model and the decoding strategies.
//!
//! Decoding strategies (greedy, contrastive, sampling, beam) only need "run these tokens, extend the cache,
//! give me logits (and hidden states)". Keeping that behind [`CausalLm`] lets each strategy be written and
//! tested once, whatever the model's placement over devices, and lets one loaded model serve many sequences:
//! the cache is an explicit value the caller owns.

use tch::{Device, Tensor};

/// What decoding needs to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
}

/// Per-layer key/value cache. Layer `i` holds `(key, value)`, each `[batch, n_head, seq, head_dim]`, on the
/// device that owns layer `i`.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        Self {
            layers: (0..n_layer).map(|_| None).collect(),
        }
    }

    /// Number of layers the cache has slots for.
    pub fn n_layer(&self) -> usize {
        self.layers.len()
    }

    /// Number of cached positions (0 before the first forward pass).
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.size()[2] as usize)
            .unwrap_or(0)
    }

    pub fn batch_size(&self) -> Option<usize> {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.size()[0] as usize)
    }

    pub fn layer(&self, i: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(i).and_then(|l| l.as_ref())
    }

    pub fn set_layer(&mut self, i: usize, key: Tensor, value: Tensor) {
        self.layers[i] = Some((key, value));
    }

    /// Keeps the batch rows `indices` (1-D int64, any device), in that order: beam reordering and picking
    /// the chosen candidate in contrastive search.
    pub fn select(&mut self, indices: &Tensor) {
        for (k, v) in self.layers.iter_mut().flatten() {
            let idx = indices.to_device(k.device());
            *k = k.index_select(0, &idx);
            *v = v.index_select(0, &idx);
        }
    }

    /// Repeats every batch row `n` times in place (row r becomes rows r*n .. r*n+n): expanding one sequence
    /// into its beams or contrastive candidates.
    pub fn repeat_interleave(&mut self, n: i64) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.repeat_interleave_self_int(n, 0, None);
            *v = v.repeat_interleave_self_int(n, 0, None);
        }
    }

    /// A deep copy (tensors are reference-counted; this copies their storage).
    pub fn deep_clone(&self) -> Self {
        Self {
            layers: self
                .layers
                .iter()
                .map(|l| l.as_ref().map(|(k, v)| (k.copy(), v.copy())))
                .collect(),
        }
    }
}

/// Output of one forward pass.
#[derive(Debug)]
pub struct StepOutput {
    /// `[batch, seq, vocab]` float32 (`seq` is 1 when only the last position was asked for), on
    /// [`CausalLm::output_device`].
    pub logits: Tensor,
    /// Final hidden states after the last LayerNorm, `[batch, seq, n_embd]` float32, when asked for.
    pub hidden: Option<Tensor>,
}

/// Which positions' logits a forward pass computes. The prefill of a long prompt only needs the last one;
/// computing the head for every position would cost `seq × vocab × n_embd` for nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    LastOnly,
    All,
    /// No head at all: the caller wants hidden states and computes logits for the rows it keeps with
    /// [`CausalLm::head`] (contrastive search keeps one of its `top_k` candidates).
    None,
}

/// A causal language model with a KV cache.
pub trait CausalLm {
    fn info(&self) -> &ModelInfo;

    /// Device where logits and hidden states come out (the head's device).
    fn output_device(&self) -> Device;

    /// Runs `input_ids` (`[batch, seq]` int64) after what `cache` holds and appends to the cache.
    ///
    /// `attention_mask` is `[batch, cache.seq_len() + seq]` int64, 1 for real tokens and 0 for left padding;
    /// `position_ids` is `[batch, seq]` int64. Inputs may be on any device; the model moves them.
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
        logits: Logits,
        output_hidden: bool,
    ) -> Result<StepOutput, tch::TchError>;

    /// Whether [`CausalLm::head`] works, so `forward` may be asked for [`Logits::None`].
    fn separate_head(&self) -> bool {
        false
    }

    /// Logits `[rows, vocab]` float32 from final hidden states `[rows, n_embd]` as `forward` returns them.
    /// Models without a separate head never get this call (see [`CausalLm::separate_head`]).
    fn head(&self, hidden: &Tensor) -> Result<Tensor, tch::TchError> {
        let _ = hidden;
        Err(tch::TchError::Kind("this model has no separate head".into()))
    }
}
