//! GPT-J's tensors: the names transformers' `GPTJForCausalLM` gives them in a checkpoint, their shapes, and
//! the part of the model each belongs to.
//!
//! This is the one description of a checkpoint's layout. The model asks the checkpoint for these tensors, the
//! placement planner sizes each part from them, and the tiny-checkpoint writer writes them; none of them
//! spells a tensor name. As in candle's model files, each part knows its tensors relative to its module path
//! (`transformer.h.3` + `attn.q_proj.weight`).

use crate::config::GptJConfig;

/// transformers' `GPTJModel`: the module of every tensor but the head's.
const TRANSFORMER: &str = "transformer";
/// The parts' module names inside `GPTJModel` (the head's is at the top).
const EMBED: &str = "wte";
const BLOCKS: &str = "h";
const NORM: &str = "ln_f";
const HEAD: &str = "lm_head";

/// A part of the model: the unit a device map places.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The token embedding.
    Embed,
    /// Transformer block `i`.
    Block(usize),
    /// The final LayerNorm.
    Norm,
    /// The untied output projection.
    Head,
}

impl Part {
    /// Every part of a model with `n_layer` blocks, in the order the forward pass runs them.
    pub fn all(n_layer: usize) -> impl Iterator<Item = Part> {
        std::iter::once(Part::Embed)
            .chain((0..n_layer).map(Part::Block))
            .chain([Part::Norm, Part::Head])
    }

    /// The module path without `transformer.`: `wte`, `h.3`, `ln_f`, `lm_head`. Older checkpoints (saved
    /// from `GPTJModel`, or by the original GPT-J conversion scripts) name tensors this way, and so do device
    /// maps.
    pub fn short_path(self) -> String {
        match self {
            Part::Embed => EMBED.to_string(),
            Part::Block(i) => format!("{BLOCKS}.{i}"),
            Part::Norm => NORM.to_string(),
            Part::Head => HEAD.to_string(),
        }
    }

    /// The module path in `GPTJForCausalLM`: `transformer.wte`, `transformer.h.3`, `transformer.ln_f`,
    /// `lm_head`.
    pub fn path(self) -> String {
        match self {
            Part::Head => self.short_path(),
            _ => format!("{TRANSFORMER}.{}", self.short_path()),
        }
    }

    /// The part's tensors, in the order transformers' `state_dict` lists them.
    pub fn weights(self) -> Vec<Weight> {
        match self {
            Part::Embed => vec![Weight::Embedding],
            Part::Block(i) => BlockWeight::ALL.iter().map(|b| Weight::Block(i, *b)).collect(),
            Part::Norm => vec![Weight::NormWeight, Weight::NormBias],
            Part::Head => vec![Weight::HeadWeight, Weight::HeadBias],
        }
    }

    /// Parameters of the part.
    pub fn params(self, cfg: &GptJConfig) -> u64 {
        self.weights().iter().map(|w| w.numel(cfg)).sum()
    }
}

/// Parameters of the whole model (its tensors; transformers' buffers are not parameters).
pub fn total_params(cfg: &GptJConfig) -> u64 {
    Part::all(cfg.n_layer).map(|p| p.params(cfg)).sum()
}

/// One tensor of a GPT-J checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Weight {
    /// The token embedding, `[vocab_size, n_embd]`.
    Embedding,
    /// A tensor of block `i`.
    Block(usize, BlockWeight),
    /// The final LayerNorm's scale and shift, `[n_embd]` each.
    NormWeight,
    NormBias,
    /// The output projection, `[vocab_size, n_embd]`, and its bias, `[vocab_size]`.
    HeadWeight,
    HeadBias,
}

/// The tensors of one block, in the order transformers' `GPTJBlock` registers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockWeight {
    /// `ln_1`, the one LayerNorm that feeds attention and the MLP, `[n_embd]` each.
    Ln1Weight,
    Ln1Bias,
    /// Attention's projections, `[n_embd, n_embd]`, without biases.
    KProj,
    VProj,
    QProj,
    OutProj,
    /// The MLP: `fc_in` `[n_inner, n_embd]` and `[n_inner]`, `fc_out` `[n_embd, n_inner]` and `[n_embd]`.
    FcInWeight,
    FcInBias,
    FcOutWeight,
    FcOutBias,
}

impl BlockWeight {
    pub const ALL: [BlockWeight; 10] = [
        BlockWeight::Ln1Weight,
        BlockWeight::Ln1Bias,
        BlockWeight::KProj,
        BlockWeight::VProj,
        BlockWeight::QProj,
        BlockWeight::OutProj,
        BlockWeight::FcInWeight,
        BlockWeight::FcInBias,
        BlockWeight::FcOutWeight,
        BlockWeight::FcOutBias,
    ];

    /// The name relative to the block's module path.
    fn local_name(self) -> &'static str {
        match self {
            BlockWeight::Ln1Weight => "ln_1.weight",
            BlockWeight::Ln1Bias => "ln_1.bias",
            BlockWeight::KProj => "attn.k_proj.weight",
            BlockWeight::VProj => "attn.v_proj.weight",
            BlockWeight::QProj => "attn.q_proj.weight",
            BlockWeight::OutProj => "attn.out_proj.weight",
            BlockWeight::FcInWeight => "mlp.fc_in.weight",
            BlockWeight::FcInBias => "mlp.fc_in.bias",
            BlockWeight::FcOutWeight => "mlp.fc_out.weight",
            BlockWeight::FcOutBias => "mlp.fc_out.bias",
        }
    }

    fn shape(self, cfg: &GptJConfig) -> Vec<usize> {
        let (e, i) = (cfg.n_embd, cfg.inner_dim());
        match self {
            BlockWeight::Ln1Weight | BlockWeight::Ln1Bias | BlockWeight::FcOutBias => vec![e],
            BlockWeight::KProj | BlockWeight::VProj | BlockWeight::QProj | BlockWeight::OutProj => vec![e, e],
            BlockWeight::FcInWeight => vec![i, e],
            BlockWeight::FcInBias => vec![i],
            BlockWeight::FcOutWeight => vec![e, i],
        }
    }
}

impl Weight {
    /// Every tensor of a model with `n_layer` blocks, part by part in forward order, each part's in
    /// `state_dict` order.
    pub fn all(n_layer: usize) -> impl Iterator<Item = Weight> {
        Part::all(n_layer).flat_map(Part::weights)
    }

    pub fn part(self) -> Part {
        match self {
            Weight::Embedding => Part::Embed,
            Weight::Block(i, _) => Part::Block(i),
            Weight::NormWeight | Weight::NormBias => Part::Norm,
            Weight::HeadWeight | Weight::HeadBias => Part::Head,
        }
    }

    /// The name in a Hugging Face checkpoint, e.g. `transformer.h.3.attn.q_proj.weight`.
    pub fn name(self) -> String {
        let local = match self {
            Weight::Embedding | Weight::NormWeight | Weight::HeadWeight => "weight",
            Weight::NormBias | Weight::HeadBias => "bias",
            Weight::Block(_, b) => b.local_name(),
        };
        format!("{}.{local}", self.part().path())
    }

    /// The shape the config gives it.
    pub fn shape(self, cfg: &GptJConfig) -> Vec<usize> {
        let (e, v) = (cfg.n_embd, cfg.vocab_size);
        match self {
            Weight::Embedding | Weight::HeadWeight => vec![v, e],
            Weight::Block(_, b) => b.shape(cfg),
            Weight::NormWeight | Weight::NormBias => vec![e],
            Weight::HeadBias => vec![v],
        }
    }

    fn numel(self, cfg: &GptJConfig) -> u64 {
        self.shape(cfg).iter().map(|d| *d as u64).product()
    }
}

/// A checkpoint's tensor name as [`Weight::name`] spells it: older checkpoints leave out the `transformer.`
/// of the transformer's tensors (see [`Part::short_path`]).
pub fn canonical_name(name: &str) -> String {
    let in_transformer = [EMBED, BLOCKS, NORM].iter().any(|module| {
        name.strip_prefix(module)
            .is_some_and(|rest| rest.starts_with('.'))
    });
    if in_transformer {
        format!("{TRANSFORMER}.{name}")
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn gptj_6b() -> GptJConfig {
        GptJConfig::gpt_j_6b()
    }

    #[test]
    fn gpt_j_6b_has_six_billion_parameters() {
        // What transformers counts for GPTJForCausalLM(GPTJConfig()) (its parameters, not the buffers).
        assert_eq!(total_params(&gptj_6b()), 6_050_882_784);
    }

    #[test]
    fn tensors_have_the_names_and_shapes_transformers_gives_them() {
        let cfg = gptj_6b();
        let named = |w: Weight| (w.name(), w.shape(&cfg));
        assert_eq!(
            named(Weight::Embedding),
            ("transformer.wte.weight".into(), vec![50400, 4096])
        );
        assert_eq!(
            named(Weight::Block(3, BlockWeight::QProj)),
            ("transformer.h.3.attn.q_proj.weight".into(), vec![4096, 4096])
        );
        assert_eq!(
            named(Weight::Block(27, BlockWeight::FcInWeight)),
            ("transformer.h.27.mlp.fc_in.weight".into(), vec![16384, 4096])
        );
        assert_eq!(
            named(Weight::NormBias),
            ("transformer.ln_f.bias".into(), vec![4096])
        );
        assert_eq!(named(Weight::HeadBias), ("lm_head.bias".into(), vec![50400]));
    }

    #[test]
    fn every_tensor_is_listed_once_part_by_part_in_forward_order() {
        let all: Vec<Weight> = Weight::all(2).collect();
        assert_eq!(all.len(), 1 + 2 * BlockWeight::ALL.len() + 2 + 2);
        let names: HashSet<String> = all.iter().map(|w| w.name()).collect();
        assert_eq!(names.len(), all.len());
        let parts: Vec<Part> = all.iter().map(|w| w.part()).collect();
        let mut forward = parts.clone();
        forward.dedup();
        assert_eq!(forward, Part::all(2).collect::<Vec<_>>());
        // Within a block, transformers' order: ln_1, then k, v, q (as GPTJAttention registers them).
        assert_eq!(
            &all[1..6],
            &[
                Weight::Block(0, BlockWeight::Ln1Weight),
                Weight::Block(0, BlockWeight::Ln1Bias),
                Weight::Block(0, BlockWeight::KProj),
                Weight::Block(0, BlockWeight::VProj),
                Weight::Block(0, BlockWeight::QProj),
            ]
        );
    }

    #[test]
    fn names_from_older_checkpoints_gain_the_transformer_prefix() {
        assert_eq!(canonical_name("h.0.ln_1.weight"), "transformer.h.0.ln_1.weight");
        assert_eq!(canonical_name("wte.weight"), "transformer.wte.weight");
        assert_eq!(canonical_name("ln_f.bias"), "transformer.ln_f.bias");
        for unchanged in ["transformer.wte.weight", "lm_head.weight", "hidden.weight", "h"] {
            assert_eq!(canonical_name(unchanged), unchanged);
        }
    }
}
