//! GPT-J as transformers' `GPTJForCausalLM` computes it, over a [`DeviceMap`].
//!
//! Per block: one LayerNorm feeds attention and the MLP in parallel, both added to the residual; rotary
//! position embedding (GPT-J's interleaved rotate-every-two form) on the first `rotary_dim` dims of each
//! query and key head; `gelu_new`; then a final LayerNorm and an untied `lm_head` with bias.
//!
//! What differs from the Python code is only how, never what: q, k and v are one fused matmul (their
//! weights concatenated at load), the rotary tables are computed once per device, attention runs through
//! `scaled_dot_product_attention`, and the head is applied to the last position only when that is all the
//! caller needs. Tensor names are the Hugging Face ones ([`crate::weights`]), so checkpoints load without
//! renaming.

// Re-exported so that this module names all a caller needs to load a model. They live in leaf modules so that
// the checkpoint reader and the placement planner, which the model uses, need not depend on the model.
pub use crate::config::{Activation, Dtype, GptJConfig};
pub use crate::load_error::LoadError;

use crate::checkpoint::{Checkpoint, TensorSpec};
use crate::device_map::{DeviceMap, Placement};
use crate::lm::{CausalLm, KvCache, Logits, ModelInfo, SlotCache, SlotStep, StepOutput};
use crate::weights::{BlockWeight, Weight};
use std::path::Path;
use tch::{Device, Kind, TchError, Tensor};

/// How to load a model: the dtype to compute in and where each part goes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoadOptions {
    pub dtype: Dtype,
    pub placement: Placement,
}

struct Block {
    device: Device,
    ln_w: Tensor,
    ln_b: Tensor,
    /// `q_proj`, `k_proj`, `v_proj` stacked: `[3 * n_embd, n_embd]`.
    qkv_w: Tensor,
    out_w: Tensor,
    fc_in_w: Tensor,
    fc_in_b: Tensor,
    fc_out_w: Tensor,
    fc_out_b: Tensor,
}

impl Block {
    /// Block `layer`'s tensors, taken out of those loaded. q, k and v are fused here, one block at a time, so
    /// the extra memory is one block's q/k/v at most.
    fn take(
        layer: usize,
        device: Device,
        take: &mut impl FnMut(Weight) -> Result<Tensor, LoadError>,
    ) -> Result<Block, LoadError> {
        let mut tensor = |w: BlockWeight| take(Weight::Block(layer, w));
        let (q, k, v) = (
            tensor(BlockWeight::QProj)?,
            tensor(BlockWeight::KProj)?,
            tensor(BlockWeight::VProj)?,
        );
        Ok(Block {
            device,
            ln_w: tensor(BlockWeight::Ln1Weight)?,
            ln_b: tensor(BlockWeight::Ln1Bias)?,
            qkv_w: Tensor::f_cat(&[q, k, v], 0)?,
            out_w: tensor(BlockWeight::OutProj)?,
            fc_in_w: tensor(BlockWeight::FcInWeight)?,
            fc_in_b: tensor(BlockWeight::FcInBias)?,
            fc_out_w: tensor(BlockWeight::FcOutWeight)?,
            fc_out_b: tensor(BlockWeight::FcOutBias)?,
        })
    }
}

/// Rotary tables for one device, float32 like transformers' `embed_positions`: `cos` and `sin` repeated
/// pairwise to `[n_positions, rotary_dim]`, with `sin`'s even entries negated so that
/// `x * cos + swap_pairs(x) * sin` is GPT-J's `x * cos + rotate_every_two(x) * sin`.
struct Rotary {
    device: Device,
    cos: Tensor,
    sin: Tensor,
}

/// What every block on one device shares during a forward pass.
struct DeviceInputs {
    device: Device,
    /// `[batch, seq, 1, 1, rotary_dim]`, broadcasting over (q|k) and heads.
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
}

/// How attention is masked in one forward pass.
enum MaskKind {
    /// Every query sees every key (one new token, no padding).
    None,
    /// Plain causal attention over the new tokens only (prefill without padding).
    Causal,
    /// Additive `[batch, 1, seq, past + seq]` mask (padding, or several tokens after a cache).
    Explicit(Tensor),
}

/// Where a forward pass keeps its keys and values.
enum Past<'a> {
    /// A prefill (or offline) cache that grows by concatenation.
    Concat(&'a mut KvCache),
    /// The running batch's slots: new keys written in place at each row's start.
    Slots {
        cache: &'a mut SlotCache,
        step: &'a SlotStep,
        /// Positions attended to: `max(starts) + Q`.
        keys: i64,
        /// The step's indexes on each device, built before the first layer.
        index: Vec<(Device, SlotIndex)>,
    },
}

/// A slot step's indexes on one device.
struct SlotIndex {
    /// Where the new keys go ([`SlotCache::write_index`]).
    write: Tensor,
    /// A packed step's `(grid, tokens)` ([`crate::lm::Packed`]): from real tokens to the attention's grid
    /// and back.
    packed: Option<(Tensor, Tensor)>,
}

impl SlotIndex {
    fn new(cache: &SlotCache, heads: i64, step: &SlotStep, device: Device) -> Result<Self, TchError> {
        let packed = match &step.packed {
            Some(p) => Some((
                Tensor::f_from_slice(&p.grid)?.f_to_device(device)?,
                Tensor::f_from_slice(&p.tokens)?.f_to_device(device)?,
            )),
            None => None,
        };
        Ok(Self {
            write: cache.write_index(heads, step, device)?,
            packed,
        })
    }
}

impl Past<'_> {
    fn n_layer(&self) -> usize {
        match self {
            Past::Concat(c) => c.n_layer(),
            Past::Slots { cache, .. } => cache.layer_count(),
        }
    }
}

/// A loaded GPT-J model. Immutable once loaded: sequences keep their state in a [`KvCache`], so one model
/// serves any number of them.
pub struct GptJ {
    cfg: GptJConfig,
    info: ModelInfo,
    dtype: Dtype,
    map: DeviceMap,
    activation: Activation,
    wte: Tensor,
    blocks: Vec<Block>,
    ln_f_w: Tensor,
    ln_f_b: Tensor,
    head_w: Tensor,
    head_b: Tensor,
    rotary: Vec<Rotary>,
}

impl std::fmt::Debug for GptJ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GptJ")
            .field("n_layer", &self.cfg.n_layer)
            .field("n_embd", &self.cfg.n_embd)
            .field("dtype", &self.dtype)
            .field("device_map", &self.map.describe())
            .finish()
    }
}

impl GptJ {
    /// Loads `dir` (`config.json` plus a checkpoint in any layout [`Checkpoint::discover`] knows).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<GptJ, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::DirNotFound(dir.to_path_buf()));
        }
        let cfg = GptJConfig::from_file(&dir.join("config.json"))?;
        let map = opts.placement.resolve(&cfg, opts.dtype)?;
        map.check_available()?;
        let checkpoint = Checkpoint::discover(dir)?;
        tracing::info!(
            dir = %dir.display(),
            format = ?checkpoint.format,
            files = checkpoint.files.len(),
            dtype = %opts.dtype,
            device_map = %map.describe(),
            "loading GPT-J"
        );
        Self::from_checkpoint(cfg, &checkpoint, opts.dtype, map)
    }

    /// Builds the model from an already discovered checkpoint and a resolved device map.
    pub fn from_checkpoint(
        cfg: GptJConfig,
        checkpoint: &Checkpoint,
        dtype: Dtype,
        map: DeviceMap,
    ) -> Result<GptJ, LoadError> {
        cfg.validate().map_err(|message| LoadError::Config {
            path: "config.json".into(),
            message,
        })?;
        if map.layers.len() != cfg.n_layer {
            return Err(LoadError::Placement(format!(
                "the device map places {} blocks, the model has {}",
                map.layers.len(),
                cfg.n_layer
            )));
        }
        let activation = cfg.activation().map_err(|message| LoadError::Config {
            path: "config.json".into(),
            message,
        })?;
        let specs: Vec<TensorSpec> = Weight::all(cfg.n_layer)
            .map(|w| TensorSpec {
                name: w.name(),
                shape: w.shape(&cfg).iter().map(|d| *d as i64).collect(),
                device: map.device(w.part()),
                kind: dtype.kind(),
            })
            .collect();
        let mut loaded = checkpoint.load(&specs)?;
        let mut take = |w: Weight| -> Result<Tensor, LoadError> {
            let name = w.name();
            loaded.remove(&name).ok_or(LoadError::MissingTensor { name })
        };

        let wte = take(Weight::Embedding)?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for (i, dev) in map.layers.iter().enumerate() {
            blocks.push(Block::take(i, *dev, &mut take)?);
        }
        let (ln_f_w, ln_f_b) = (take(Weight::NormWeight)?, take(Weight::NormBias)?);
        let (head_w, head_b) = (take(Weight::HeadWeight)?, take(Weight::HeadBias)?);

        let mut rotary: Vec<Rotary> = Vec::new();
        for dev in &map.layers {
            if !rotary.iter().any(|r| r.device == *dev) {
                rotary.push(rotary_tables(cfg.n_positions, cfg.rotary_dim(), *dev)?);
            }
        }
        let info = ModelInfo {
            vocab_size: cfg.vocab_size,
            n_positions: cfg.n_positions,
            n_embd: cfg.n_embd,
            n_layer: cfg.n_layer,
            bos_token_id: cfg.bos_token_id,
            eos_token_id: cfg.eos_token_id,
        };
        Ok(GptJ {
            cfg,
            info,
            dtype,
            map,
            activation,
            wte,
            blocks,
            ln_f_w,
            ln_f_b,
            head_w,
            head_b,
            rotary,
        })
    }

    pub fn config(&self) -> &GptJConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    pub fn device_map(&self) -> &DeviceMap {
        &self.map
    }

    /// Bytes of weights held on each device.
    pub fn weight_bytes(&self) -> Vec<(Device, u64)> {
        let mut out: Vec<(Device, u64)> = Vec::new();
        let mut add = |d: Device, t: &Tensor| {
            let n = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
            match out.iter_mut().find(|(dd, _)| *dd == d) {
                Some((_, b)) => *b += n,
                None => out.push((d, n)),
            }
        };
        add(self.map.embed, &self.wte);
        for b in &self.blocks {
            for t in [
                &b.ln_w,
                &b.ln_b,
                &b.qkv_w,
                &b.out_w,
                &b.fc_in_w,
                &b.fc_in_b,
                &b.fc_out_w,
                &b.fc_out_b,
            ] {
                add(b.device, t);
            }
        }
        add(self.map.norm, &self.ln_f_w);
        add(self.map.norm, &self.ln_f_b);
        add(self.map.head, &self.head_w);
        add(self.map.head, &self.head_b);
        out
    }

    fn forward_inner(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
        logits: Logits,
        output_hidden: bool,
    ) -> Result<StepOutput, TchError> {
        let (batch, seq) = input_ids.size2()?;
        let past = cache.seq_len() as i64;
        let total = past + seq;
        if let Some(b) = cache.batch_size()
            && b as i64 != batch
        {
            return Err(TchError::Shape(format!(
                "batch of {batch} rows after a KV cache of {b}"
            )));
        }
        if attention_mask.size() != [batch, total] {
            return Err(TchError::Shape(format!(
                "attention_mask is {:?}, expected [{batch}, {total}] (cached + new positions)",
                attention_mask.size()
            )));
        }
        let mask_kind = self.mask_kind(attention_mask, batch, seq, past)?;
        self.run(
            input_ids,
            position_ids,
            mask_kind,
            Past::Concat(cache),
            logits,
            output_hidden,
        )
    }

    fn forward_slots_inner(
        &self,
        step: &SlotStep,
        cache: &mut SlotCache,
        logits: Logits,
        output_hidden: bool,
    ) -> Result<StepOutput, TchError> {
        let (batch, seq) = (step.starts.len() as i64, step.queries() as i64);
        let keys = step.keys() as i64;
        let expected = match &step.packed {
            Some(p) => vec![1, p.tokens.len() as i64],
            None => vec![batch, seq],
        };
        if step.ids.size() != expected || step.positions.size() != expected {
            return Err(TchError::Shape(format!(
                "a step's ids {:?} and positions {:?}, expected {expected:?}",
                step.ids.size(),
                step.positions.size()
            )));
        }
        if batch as usize > cache.rows() {
            return Err(TchError::Shape(format!(
                "a step of {batch} rows ({} starts) over a slot cache of {} rows",
                step.starts.len(),
                cache.rows()
            )));
        }
        if keys as usize > cache.positions() {
            return Err(TchError::Shape(format!(
                "a step reaching position {keys} in a slot cache of {} positions",
                cache.positions()
            )));
        }
        let mask_kind = match &step.visible {
            None => MaskKind::None,
            Some(visible) => {
                if visible.size() != [batch, seq, keys] {
                    return Err(TchError::Shape(format!(
                        "visible is {:?}, expected [{batch}, {seq}, {keys}]",
                        visible.size()
                    )));
                }
                MaskKind::Explicit(self.additive_mask(&visible.f_view([batch, 1, seq, keys])?)?)
            }
        };
        let past = Past::Slots {
            cache,
            step,
            keys,
            index: Vec::new(),
        };
        self.run(&step.ids, &step.positions, mask_kind, past, logits, output_hidden)
    }

    /// The additive attention bias for a boolean `[batch, 1, seq, keys]` visibility: hidden entries get a
    /// large negative bias (finite, so rows of padding queries stay finite instead of becoming NaN).
    fn additive_mask(&self, visible: &Tensor) -> Result<Tensor, TchError> {
        let hidden_bias = match self.dtype {
            Dtype::Float16 => -65504.0 / 2.0,
            _ => f32::MIN as f64 / 2.0,
        };
        let zeros = Tensor::f_zeros(visible.size(), (self.dtype.kind(), visible.device()))?;
        zeros.f_masked_fill(&visible.f_logical_not()?, hidden_bias)
    }

    fn run(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        mask_kind: MaskKind,
        mut past_kv: Past<'_>,
        logits: Logits,
        output_hidden: bool,
    ) -> Result<StepOutput, TchError> {
        let (batch, seq) = input_ids.size2()?;
        let total = match &past_kv {
            Past::Concat(c) => c.seq_len() as i64 + seq,
            Past::Slots { keys, .. } => *keys,
        };
        if past_kv.n_layer() != self.cfg.n_layer {
            return Err(TchError::Shape(format!(
                "the KV cache has {} layers, the model {}",
                past_kv.n_layer(),
                self.cfg.n_layer
            )));
        }
        if seq == 0 {
            return Err(TchError::Shape("no input tokens".into()));
        }
        if position_ids.size() != [batch, seq] {
            return Err(TchError::Shape(format!(
                "position_ids is {:?}, expected [{batch}, {seq}]",
                position_ids.size()
            )));
        }
        if total as usize > self.cfg.n_positions {
            return Err(TchError::Shape(format!(
                "{total} positions exceed the model's n_positions {}",
                self.cfg.n_positions
            )));
        }

        // Every input a device needs (positions, rotary angles, the mask, the slot cache's write index) is
        // uploaded before the first layer runs: on a GPU an upload inside the layer loop waits for the
        // kernels queued before it, so the host would stop feeding the device mid-step.
        let mut per_device: Vec<DeviceInputs> = Vec::with_capacity(self.rotary.len());
        for block in &self.blocks {
            if !per_device.iter().any(|d| d.device == block.device) {
                per_device.push(self.device_inputs(block.device, position_ids, &mask_kind, batch, seq)?);
            }
        }
        if let Past::Slots {
            cache, step, index, ..
        } = &mut past_kv
        {
            let nh = self.cfg.n_head as i64;
            for d in &per_device {
                index.push((d.device, SlotIndex::new(cache, nh, step, d.device)?));
            }
        }
        let mut h = Tensor::f_embedding(
            &self.wte,
            &input_ids.f_to_device(self.map.embed)?,
            -1,
            false,
            false,
        )?;
        for (i, block) in self.blocks.iter().enumerate() {
            let dev = block.device;
            if h.device() != dev {
                h = h.f_to_device(dev)?;
            }
            let inputs = match per_device.iter().position(|d| d.device == dev) {
                Some(j) => &per_device[j],
                None => {
                    per_device.push(self.device_inputs(dev, position_ids, &mask_kind, batch, seq)?);
                    &per_device[per_device.len() - 1]
                }
            };
            let is_causal = matches!(mask_kind, MaskKind::Causal);
            h = self.block_forward(block, i, &h, inputs, &mut past_kv, is_causal)?;
        }

        let h = match (logits, output_hidden) {
            (Logits::LastOnly, false) => h.f_narrow(1, seq - 1, 1)?,
            _ => h,
        };
        let h = h.f_to_device(self.map.norm)?;
        let normed = h.f_layer_norm(
            [self.cfg.n_embd as i64],
            Some(&self.ln_f_w),
            Some(&self.ln_f_b),
            self.cfg.layer_norm_epsilon,
            false,
        )?;
        let normed = normed.f_to_device(self.map.head)?;
        let out = match logits {
            Logits::None => Tensor::f_zeros(
                [batch, 0, self.cfg.vocab_size as i64],
                (Kind::Float, self.map.head),
            )?,
            Logits::LastOnly if output_hidden => normed
                .f_narrow(1, seq - 1, 1)?
                .f_linear(&self.head_w, Some(&self.head_b))?
                .f_to_kind(Kind::Float)?,
            _ => normed
                .f_linear(&self.head_w, Some(&self.head_b))?
                .f_to_kind(Kind::Float)?,
        };
        let hidden = if output_hidden {
            Some(normed.f_to_kind(Kind::Float)?)
        } else {
            None
        };
        Ok(StepOutput { logits: out, hidden })
    }

    fn mask_kind(
        &self,
        attention_mask: &Tensor,
        batch: i64,
        seq: i64,
        past: i64,
    ) -> Result<MaskKind, TchError> {
        let padded = attention_mask.f_min()?.f_int64_value(&[])? == 0;
        if !padded && seq == 1 {
            return Ok(MaskKind::None);
        }
        if !padded && past == 0 {
            return Ok(MaskKind::Causal);
        }
        // As transformers builds it: key j is visible to query i (absolute position past + i) when
        // j <= past + i and the mask marks j as a real token.
        let total = past + seq;
        let dev = attention_mask.device();
        let keys = Tensor::f_arange(total, (Kind::Int64, dev))?.f_view([1, total])?;
        let queries = Tensor::f_arange_start(past, total, (Kind::Int64, dev))?.f_view([seq, 1])?;
        let causal = keys.f_le_tensor(&queries)?.f_view([1, 1, seq, total])?;
        let real = attention_mask.f_ne(0)?.f_view([batch, 1, 1, total])?;
        let visible = causal.f_logical_and(&real)?;
        Ok(MaskKind::Explicit(self.additive_mask(&visible)?))
    }

    fn device_inputs(
        &self,
        device: Device,
        position_ids: &Tensor,
        mask: &MaskKind,
        batch: i64,
        seq: i64,
    ) -> Result<DeviceInputs, TchError> {
        let rot = self
            .rotary
            .iter()
            .find(|r| r.device == device)
            .ok_or_else(|| TchError::Torch(format!("no rotary tables on {device:?}")))?;
        let pos = position_ids.f_to_device(device)?.f_reshape([-1])?;
        let rd = self.cfg.rotary_dim() as i64;
        let cos = rot.cos.f_index_select(0, &pos)?.f_view([batch, seq, 1, 1, rd])?;
        let sin = rot.sin.f_index_select(0, &pos)?.f_view([batch, seq, 1, 1, rd])?;
        let mask = match mask {
            MaskKind::Explicit(m) => Some(m.f_to_device(device)?),
            _ => None,
        };
        Ok(DeviceInputs {
            device,
            cos,
            sin,
            mask,
        })
    }

    fn block_forward(
        &self,
        b: &Block,
        layer: usize,
        h: &Tensor,
        inputs: &DeviceInputs,
        past_kv: &mut Past<'_>,
        is_causal: bool,
    ) -> Result<Tensor, TchError> {
        let cfg = &self.cfg;
        let (batch, seq, e) = h.size3()?;
        let (nh, hd, rd) = (cfg.n_head as i64, cfg.head_dim() as i64, cfg.rotary_dim() as i64);
        let x = h.f_layer_norm([e], Some(&b.ln_w), Some(&b.ln_b), cfg.layer_norm_epsilon, false)?;

        let qkv = x
            .f_linear::<&Tensor>(&b.qkv_w, None)?
            .f_view([batch, seq, 3, nh, hd])?;
        // Rotary on the first `rotary_dim` dims of q and k at once, written back into `qkv`.
        let mut qk_rot = qkv.f_narrow(2, 0, 2)?.f_narrow(4, 0, rd)?;
        let swapped = qk_rot
            .f_view([batch, seq, 2, nh, rd / 2, 2])?
            .f_flip([-1])?
            .f_view([batch, seq, 2, nh, rd])?;
        let rotated = qk_rot.f_mul(&inputs.cos)?.f_add(&swapped.f_mul(&inputs.sin)?)?;
        qk_rot.f_copy_(&rotated)?;

        let scale = 1.0 / (hd as f64).sqrt();
        let attn = match past_kv {
            Past::Concat(cache) => {
                let q = qkv.f_select(2, 0)?.f_permute([0, 2, 1, 3])?;
                let k = qkv.f_select(2, 1)?.f_permute([0, 2, 1, 3])?;
                let v = qkv.f_select(2, 2)?.f_permute([0, 2, 1, 3])?;
                let (k, v) = match cache.layer(layer) {
                    Some((pk, pv)) => (Tensor::f_cat(&[pk, &k], 2)?, Tensor::f_cat(&[pv, &v], 2)?),
                    None => (k.f_contiguous()?, v.f_contiguous()?),
                };
                cache.set_layer(layer, k.shallow_clone(), v.shallow_clone());
                let mask = inputs.mask.as_ref();
                let attn =
                    Tensor::f_scaled_dot_product_attention(&q, &k, &v, mask, 0.0, is_causal, scale, false)?;
                attn.f_permute([0, 2, 1, 3])?.f_reshape([batch, seq, e])?
            }
            Past::Slots {
                cache,
                step,
                keys,
                index,
            } => {
                let at = match index.iter().position(|(d, _)| *d == b.device) {
                    Some(at) => at,
                    None => {
                        index.push((b.device, SlotIndex::new(cache, nh, step, b.device)?));
                        index.len() - 1
                    }
                };
                let SlotIndex { write, packed } = &index[at].1;
                // The new keys, `[batch, seq, H, D]`, flatten to the write index's order.
                cache.write(layer, &qkv.f_select(2, 1)?, &qkv.f_select(2, 2)?, write)?;
                let (rows, queries) = (step.starts.len() as i64, step.queries() as i64);
                let (k, v) = cache.view(layer, rows as usize, *keys as usize)?;
                // Attention runs on the `[S, Q]` grid; a packed step's real tokens are laid out on it.
                let q = qkv.f_select(2, 0)?;
                let q = match packed {
                    None => q,
                    Some((grid, _)) => q
                        .f_squeeze_dim(0)?
                        .f_index_select(0, grid)?
                        .f_view([rows, queries, nh, hd])?,
                };
                let q = q.f_permute([0, 2, 1, 3])?;
                let mask = inputs.mask.as_ref();
                let attn =
                    Tensor::f_scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, scale, false)?;
                let attn = attn.f_permute([0, 2, 1, 3])?.f_reshape([rows * queries, e])?;
                match packed {
                    None => attn,
                    Some((_, tokens)) => attn.f_index_select(0, tokens)?,
                }
                .f_view([batch, seq, e])?
            }
        };
        self.block_rest(b, h, &x, &attn)
    }

    /// A block's attention output projection, its MLP (in parallel, on the same normed input `x`) and the
    /// residual, from the attention's heads `[batch, seq, n_embd]`.
    fn block_rest(&self, b: &Block, h: &Tensor, x: &Tensor, attn: &Tensor) -> Result<Tensor, TchError> {
        let attn = attn.f_linear::<&Tensor>(&b.out_w, None)?;

        let mlp = x.f_linear(&b.fc_in_w, Some(&b.fc_in_b))?;
        let mlp = match self.activation {
            Activation::GeluNew => mlp.f_gelu("tanh")?,
            Activation::Gelu => mlp.f_gelu("none")?,
            Activation::Relu => mlp.f_relu()?,
        };
        let mlp = mlp.f_linear(&b.fc_out_w, Some(&b.fc_out_b))?;
        attn.f_add(&mlp)?.f_add(h)
    }
}

fn rotary_tables(n_positions: usize, rotary_dim: usize, device: Device) -> Result<Rotary, TchError> {
    // transformers: inv_freq = 1 / 10000^(arange(0, dim, 2) / dim); angles = outer(arange(n_positions), inv_freq),
    // all in float32 on the CPU; computed the same way here so the tables match bit for bit.
    let opts = (Kind::Float, Device::Cpu);
    let exponents = Tensor::f_arange_start_step(0, rotary_dim as i64, 2, (Kind::Int64, Device::Cpu))?
        .f_to_kind(Kind::Float)?
        .f_div_scalar(rotary_dim as f64)?;
    let inv_freq = Tensor::f_pow_scalar(10000.0, &exponents)?.f_reciprocal()?;
    let positions = Tensor::f_arange(n_positions as i64, opts)?;
    let angles = positions.f_outer(&inv_freq)?;
    let cos = angles.f_cos()?.f_repeat_interleave_self_int(2, 1, None)?;
    let sin = angles.f_sin()?.f_repeat_interleave_self_int(2, 1, None)?;
    let signs = Tensor::from_slice(&[-1.0f32, 1.0]).f_repeat([rotary_dim as i64 / 2])?;
    let sin = sin.f_mul(&signs)?;
    Ok(Rotary {
        device,
        cos: cos.f_to_device(device)?,
        sin: sin.f_to_device(device)?,
    })
}

impl CausalLm for GptJ {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn output_device(&self) -> Device {
        self.map.head
    }

    fn separate_head(&self) -> bool {
        true
    }

    fn head(&self, hidden: &Tensor) -> Result<Tensor, TchError> {
        // `forward` hands hidden states out as float32 copies of values computed in the model's dtype, so
        // converting back is exact and the head sees what it would have seen inside `forward`.
        tch::no_grad(|| {
            hidden
                .f_to_device(self.map.head)?
                .f_to_kind(self.dtype.kind())?
                .f_linear(&self.head_w, Some(&self.head_b))?
                .f_to_kind(Kind::Float)
        })
    }

    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
        logits: Logits,
        output_hidden: bool,
    ) -> Result<StepOutput, TchError> {
        tch::no_grad(|| {
            self.forward_inner(
                input_ids,
                attention_mask,
                position_ids,
                cache,
                logits,
                output_hidden,
            )
        })
    }

    fn forward_slots(
        &self,
        step: &SlotStep,
        cache: &mut SlotCache,
        logits: Logits,
        output_hidden: bool,
    ) -> Result<StepOutput, TchError> {
        tch::no_grad(|| self.forward_slots_inner(step, cache, logits, output_hidden))
    }
}
