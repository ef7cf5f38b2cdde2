//! Everything that can go wrong between a model directory on disk and a model ready to run.
//!
//! One enum for the whole load boundary (config, checkpoint files, placement, tokenizer), so the command
//! line and the service report a bad model the same way, and a broken checkpoint is never a panic. It is a
//! leaf: the config, the checkpoint reader, the placement planner and the tokenizer loader return it, and the
//! model that uses them all re-exports it.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model directory {0} does not exist or is not a directory")]
    DirNotFound(PathBuf),
    #[error("file {0} does not exist")]
    FileNotFound(PathBuf),
    #[error(
        "no checkpoint in {0}: expected model.safetensors, model.safetensors.index.json, pytorch_model.bin \
         or pytorch_model.bin.index.json"
    )]
    NoCheckpoint(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path} describes a {model_type:?} model, not GPT-J (model_type \"gptj\")")]
    NotGptJ { path: PathBuf, model_type: String },
    #[error("bad checkpoint index {path}: {message}")]
    BadIndex { path: PathBuf, message: String },
    #[error("bad checkpoint file {path}: {message}")]
    BadCheckpoint { path: PathBuf, message: String },
    #[error("tensor {name} is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {found:?} in the checkpoint, the config needs {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("unknown dtype {0:?}: expected float32 (fp32), float16 (fp16) or bfloat16 (bf16)")]
    UnknownDtype(String),
    #[error("tensor {name} has dtype {dtype}, which a GPT-J checkpoint cannot hold")]
    UnsupportedTensorDtype { name: String, dtype: String },
    #[error("bad device placement: {0}")]
    Placement(String),
    #[error("device {0} is not available on this machine")]
    DeviceUnavailable(String),
    #[error(
        "not enough memory for the model: it needs {needed} bytes ({needed_gib:.2} GiB) with room for the KV \
         cache, the budgets give {available} bytes ({available_gib:.2} GiB)",
        needed_gib = *needed as f64 / GIB,
        available_gib = *available as f64 / GIB
    )]
    NotEnoughMemory { needed: u64, available: u64 },
    #[error("bad tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

const GIB: f64 = (1u64 << 30) as f64;

impl LoadError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            LoadError::FileNotFound(path.to_path_buf())
        } else {
            LoadError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }

    pub(crate) fn bad_file(path: &Path, message: impl Into<String>) -> Self {
        LoadError::BadCheckpoint {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}
