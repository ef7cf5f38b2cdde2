//! GPT-J's `config.json` and the dtype the weights are computed in.
//!
//! The struct deserializes straight from the file Hugging Face publishes; values transformers derives (head
//! size, MLP width when `n_inner` is null) are methods, so the file stays the single source of truth.
//! It sits below everything that reads it (the model, the checkpoint layout, the placement planner, the
//! tiny-checkpoint writer), so none of them has to depend on another to learn a model's shape.

use crate::load_error::LoadError;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::str::FromStr;
use tch::Kind;

/// The fields of a GPT-J `config.json` that the model uses (others are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptJConfig {
    /// Must be `"gptj"`: loading another architecture's weights would fail late and obscurely.
    pub model_type: String,
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Dimensions of each head that get the rotary embedding; `None` means all of them.
    #[serde(default)]
    pub rotary_dim: Option<usize>,
    /// MLP width; `None` means `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<i64>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// The dtype the checkpoint was saved in (informational: the dtype to load in is the caller's choice).
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

fn default_activation() -> String {
    "gelu_new".to_string()
}

fn default_layer_norm_epsilon() -> f64 {
    1e-5
}

/// The MLP activations transformers' `ACT2FN` offers that a GPT-J config may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new`: the tanh approximation GPT-J was trained with.
    GeluNew,
    /// `gelu`: the exact erf form.
    Gelu,
    Relu,
}

impl GptJConfig {
    /// GPT-J-6B's published shape, for tests that size the real model.
    #[cfg(test)]
    pub(crate) fn gpt_j_6b() -> Self {
        serde_json::from_value(serde_json::json!({
            "model_type": "gptj", "vocab_size": 50400, "n_positions": 2048, "n_embd": 4096, "n_layer": 28,
            "n_head": 16, "rotary_dim": 64
        }))
        .expect("valid config")
    }

    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoadError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        // Check the architecture before the fields: another model's config lacks GPT-J's fields, and
        // "missing field n_embd" would hide the real problem.
        match raw.get("model_type").and_then(|v| v.as_str()) {
            Some("gptj") => {}
            other => {
                return Err(LoadError::NotGptJ {
                    path: path.to_path_buf(),
                    model_type: other.unwrap_or("<missing>").to_string(),
                });
            }
        }
        let cfg: Self = serde_json::from_value(raw).map_err(|e| LoadError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate().map_err(|message| LoadError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    /// Consistency checks transformers would otherwise trip over mid-forward.
    pub fn validate(&self) -> Result<(), String> {
        if self.model_type != "gptj" {
            return Err(format!("model_type is {:?}, not \"gptj\"", self.model_type));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        let rd = self.rotary_dim();
        if rd == 0 || !rd.is_multiple_of(2) || rd > self.head_dim() {
            return Err(format!(
                "rotary_dim {rd} must be even, positive and at most the head size {}",
                self.head_dim()
            ));
        }
        self.activation()?;
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim.unwrap_or_else(|| self.head_dim())
    }

    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    pub fn activation(&self) -> Result<Activation, String> {
        match self.activation_function.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluNew),
            "gelu" => Ok(Activation::Gelu),
            "relu" => Ok(Activation::Relu),
            other => Err(format!("unsupported activation_function {other:?}")),
        }
    }
}

/// The dtype weights are converted to on load and computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    Float32,
    Float16,
    BFloat16,
}

impl Dtype {
    pub fn kind(self) -> Kind {
        match self {
            Dtype::Float32 => Kind::Float,
            Dtype::Float16 => Kind::Half,
            Dtype::BFloat16 => Kind::BFloat16,
        }
    }

    pub fn size_in_bytes(self) -> u64 {
        match self {
            Dtype::Float32 => 4,
            Dtype::Float16 | Dtype::BFloat16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::Float32 => "float32",
            Dtype::Float16 => "float16",
            Dtype::BFloat16 => "bfloat16",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dtype {
    type Err = LoadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "float32" | "fp32" | "f32" => Ok(Dtype::Float32),
            "float16" | "fp16" | "f16" | "half" => Ok(Dtype::Float16),
            "bfloat16" | "bf16" => Ok(Dtype::BFloat16),
            _ => Err(LoadError::UnknownDtype(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_parse_and_unknown_ones_are_rejected() {
        assert_eq!("fp16".parse::<Dtype>().ok(), Some(Dtype::Float16));
        assert_eq!("BFloat16".parse::<Dtype>().ok(), Some(Dtype::BFloat16));
        assert_eq!("float32".parse::<Dtype>().ok(), Some(Dtype::Float32));
        let err = "int8"
            .parse::<Dtype>()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("int8") && err.contains("float16"), "{err}");
    }
}
