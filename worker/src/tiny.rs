//! Small random GPT-J checkpoints for tests, demos and benchmarks.
//!
//! Real weights cannot be downloaded here, and tests need a model that loads in milliseconds. The files are
//! exactly what transformers' `save_pretrained` publishes (config.json, sharded safetensors with an index,
//! tokenizer.json), so transformers can load them too; the same seed always gives the same bytes. The
//! shards are written by the `safetensors` crate, the format's reference implementation.

use crate::config::{Dtype, GptJConfig};
use crate::load_error::LoadError;
use crate::weights::{BlockWeight, Weight};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensorError;
use safetensors::tensor::TensorView;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// The shape of a random model to write.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub rotary_dim: usize,
    pub n_inner: usize,
    pub vocab_size: usize,
    pub n_positions: usize,
    /// Dtype the weights are stored in.
    pub dtype: Dtype,
    /// Number of safetensors shards (at least 2, so every test exercises the sharded layout).
    pub shards: usize,
}

impl TinyConfig {
    /// 3 layers × 64 wide, GPT-J's vocabulary: loads instantly, still a real GPT-J shape.
    pub fn tiny() -> Self {
        Self {
            n_layer: 3,
            n_embd: 64,
            n_head: 4,
            rotary_dim: 8,
            n_inner: 256,
            vocab_size: 50400,
            n_positions: 2048,
            dtype: Dtype::Float32,
            shards: 2,
        }
    }

    /// 8 layers × 1024 wide (about 0.2 B parameters): big enough that decoding is bound by memory bandwidth.
    pub fn medium() -> Self {
        Self {
            n_layer: 8,
            n_embd: 1024,
            n_head: 16,
            rotary_dim: 64,
            n_inner: 4096,
            vocab_size: 50400,
            n_positions: 2048,
            dtype: Dtype::Float32,
            shards: 3,
        }
    }

    /// The `config.json` transformers' `GPTJConfig` would write for this shape.
    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["GPTJForCausalLM"],
            "model_type": "gptj",
            "activation_function": "gelu_new",
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-5,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "n_layer": self.n_layer,
            "n_positions": self.n_positions,
            "rotary_dim": self.rotary_dim,
            "tie_word_embeddings": false,
            "torch_dtype": self.dtype.name(),
            "use_cache": true,
            "vocab_size": self.vocab_size,
        })
    }

    pub fn gptj_config(&self) -> Result<GptJConfig, LoadError> {
        serde_json::from_value(self.config_json()).map_err(|e| LoadError::Config {
            path: "<tiny config>".into(),
            message: e.to_string(),
        })
    }
}

/// How a tensor is initialised: uniform noise of a given standard deviation around a centre.
struct Init {
    centre: f32,
    std: f32,
}

/// How transformers would initialise `weight` (LayerNorm scales around 1, everything else around 0).
fn init(weight: Weight, cfg: &GptJConfig) -> Init {
    match weight {
        Weight::Block(_, BlockWeight::Ln1Weight) | Weight::NormWeight => Init {
            centre: 1.0,
            std: 0.02,
        },
        // A wider head than transformers' 0.02 makes the next-token distribution peaked, so greedy and beam
        // search have clear winners instead of near-ties decided by rounding.
        Weight::HeadWeight => Init {
            centre: 0.0,
            std: 1.0 / (cfg.n_embd as f32).sqrt(),
        },
        _ => Init {
            centre: 0.0,
            std: 0.02,
        },
    }
}

/// Deterministic values for tensor number `index`: its own ChaCha stream, so every tensor's values depend
/// on the seed and its position only.
fn values(seed: u64, index: usize, numel: usize, init: &Init) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    // Uniform on [-a, a] has standard deviation a / sqrt(3).
    let a = init.std * 3f32.sqrt();
    (0..numel)
        .map(|_| {
            let u = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
            init.centre + a * (2.0 * u - 1.0)
        })
        .collect()
}

fn to_bytes(values: &[f32], dtype: Dtype) -> Result<Vec<u8>, LoadError> {
    if dtype == Dtype::Float32 {
        return Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect());
    }
    let t = Tensor::from_slice(values).f_to_kind(dtype.kind())?;
    let mut out = vec![0u8; values.len() * 2];
    t.f_copy_data_u8(&mut out, values.len())?;
    Ok(out)
}

fn st_dtype(dtype: Dtype) -> safetensors::Dtype {
    match dtype {
        Dtype::Float32 => safetensors::Dtype::F32,
        Dtype::Float16 => safetensors::Dtype::F16,
        Dtype::BFloat16 => safetensors::Dtype::BF16,
    }
}

fn write_error(path: &Path, e: SafeTensorError) -> LoadError {
    match e {
        SafeTensorError::IoError(e) => LoadError::io(path, e),
        other => LoadError::bad_file(path, other.to_string()),
    }
}

/// Writes a random GPT-J with `cfg`'s shape to `dir` (created if needed): `config.json`,
/// `model-0000N-of-0000M.safetensors` shards, `model.safetensors.index.json`, `tokenizer.json`.
pub fn write_tiny_model(dir: &Path, cfg: &TinyConfig, seed: u64) -> Result<(), LoadError> {
    let gcfg = cfg.gptj_config()?;
    gcfg.validate().map_err(|message| LoadError::Config {
        path: dir.join("config.json"),
        message,
    })?;
    if cfg.shards < 2 {
        return Err(LoadError::Config {
            path: dir.join("config.json"),
            message: "write at least 2 shards".into(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| LoadError::io(dir, e))?;
    // In transformers' order: a tensor's index there seeds its values.
    let weights: Vec<Weight> = Weight::all(gcfg.n_layer).collect();
    let shapes: Vec<Vec<usize>> = weights.iter().map(|w| w.shape(&gcfg)).collect();
    let elt = cfg.dtype.size_in_bytes();
    let total: u64 = shapes
        .iter()
        .map(|s| s.iter().product::<usize>() as u64 * elt)
        .sum();

    // Cut into shards of about equal size, in order, as save_pretrained(max_shard_size=…) does.
    let per_shard = total.div_ceil(cfg.shards as u64);
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut in_group = 0u64;
    for (idx, shape) in shapes.iter().enumerate() {
        let bytes = shape.iter().product::<usize>() as u64 * elt;
        if in_group > 0 && in_group + bytes > per_shard && groups.len() < cfg.shards {
            groups.push(Vec::new());
            in_group = 0;
        }
        if let Some(g) = groups.last_mut() {
            g.push(idx);
        }
        in_group += bytes;
    }
    while groups.len() < cfg.shards {
        // More shards asked than the sizes gave: split the group with the most tensors.
        let big = (0..groups.len()).max_by_key(|g| groups[*g].len()).unwrap_or(0);
        let half = groups[big].len() / 2;
        let tail = groups[big].split_off(half);
        groups.insert(big + 1, tail);
    }

    let n = groups.len();
    let mut weight_map = BTreeMap::new();
    // What transformers' `save_pretrained` puts in every shard's metadata.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    for (s, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", s + 1);
        let path = dir.join(&file);
        // One shard in memory at a time, as save_pretrained holds it.
        let mut data: Vec<(String, Vec<u8>, &[usize])> = Vec::with_capacity(group.len());
        for &idx in group {
            let (weight, shape) = (weights[idx], &shapes[idx]);
            let vals = values(seed, idx, shape.iter().product(), &init(weight, &gcfg));
            data.push((weight.name(), to_bytes(&vals, cfg.dtype)?, shape));
        }
        let views = data
            .iter()
            .map(|(name, bytes, shape)| {
                Ok((
                    name.as_str(),
                    TensorView::new(st_dtype(cfg.dtype), shape.to_vec(), bytes)?,
                ))
            })
            .collect::<Result<Vec<_>, SafeTensorError>>()
            .map_err(|e| write_error(&path, e))?;
        safetensors::serialize_to_file(views, Some(metadata.clone()), &path)
            .map_err(|e| write_error(&path, e))?;
        for (name, _, _) in data {
            weight_map.insert(name, file.clone());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    write_json(&dir.join("model.safetensors.index.json"), &index)?;
    write_json(&dir.join("config.json"), &cfg.config_json())?;
    let tok = dir.join("tokenizer.json");
    std::fs::write(&tok, crate::tokenizer::GPTJ_TOKENIZER_JSON).map_err(|e| LoadError::io(&tok, e))?;
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), LoadError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| LoadError::bad_file(path, e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| LoadError::io(path, e))
}

/// Which preset `init-tiny-model` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 3 layers × 64 wide.
    Tiny,
    /// 8 layers × 1024 wide.
    Medium,
}

fn parse_dtype(s: &str) -> Result<Dtype, String> {
    s.parse::<Dtype>().map_err(|e| e.to_string())
}

/// `worker init-tiny-model DIR [--seed N] [--preset tiny|medium] [--dtype float32|float16|bfloat16]`.
#[derive(Debug, clap::Args)]
pub struct InitTinyModelArgs {
    /// Directory to write the checkpoint to (created if missing).
    pub dir: PathBuf,
    /// Seed of the random weights: the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = Preset::Tiny)]
    pub preset: Preset,
    /// Dtype the weights are stored in.
    #[arg(long, default_value = "float32", value_parser = parse_dtype)]
    pub dtype: Dtype,
}

pub fn run_init(args: InitTinyModelArgs) -> anyhow::Result<()> {
    let mut cfg = match args.preset {
        Preset::Tiny => TinyConfig::tiny(),
        Preset::Medium => TinyConfig::medium(),
    };
    cfg.dtype = args.dtype;
    write_tiny_model(&args.dir, &cfg, args.seed)?;
    println!(
        "wrote a random {:?} GPT-J ({}, seed {}) to {}",
        args.preset,
        cfg.dtype,
        args.seed,
        args.dir.display()
    );
    Ok(())
}
