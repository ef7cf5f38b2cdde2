//! Reading Hugging Face checkpoints: `model.safetensors`, `pytorch_model.bin`, and the sharded layouts with
//! their `*.index.json`, as published for GPT-J.
//!
//! The loader goes shard by shard and puts each tensor straight onto the device that owns it, converted to
//! the dtype asked for, so host memory peaks near what the CPU keeps plus one tensor in flight: tensors are
//! read with positioned reads into freshly allocated tensors (no memory map whose touched pages would count
//! as resident, no intermediate byte buffer).

mod pickle;
mod read;
mod safetensors;

pub use read::TensorSpec;

use crate::load_error::LoadError;
use crate::weights::canonical_name;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// On-disk format of the checkpoint files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    /// `torch.save`'s zip archive with a pickled state dict.
    PytorchBin,
}

/// A checkpoint found in a model directory: its files, in load order.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub format: Format,
    pub files: Vec<PathBuf>,
    /// Tensor name → file, from the index (sharded layouts only). Lets a missing shard file or a tensor
    /// missing from every shard be reported by name.
    pub weight_map: Option<HashMap<String, PathBuf>>,
}

impl Checkpoint {
    /// Finds the checkpoint in `dir`, preferring safetensors, then sharded over single files.
    pub fn discover(dir: &Path) -> Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::DirNotFound(dir.to_path_buf()));
        }
        let candidates = [
            ("model.safetensors.index.json", Format::Safetensors, true),
            ("model.safetensors", Format::Safetensors, false),
            ("pytorch_model.bin.index.json", Format::PytorchBin, true),
            ("pytorch_model.bin", Format::PytorchBin, false),
        ];
        for (file, format, indexed) in candidates {
            let path = dir.join(file);
            if !path.is_file() {
                continue;
            }
            if !indexed {
                return Ok(Self {
                    format,
                    files: vec![path],
                    weight_map: None,
                });
            }
            let (files, weight_map) = read_index(&path, dir)?;
            return Ok(Self {
                format,
                files,
                weight_map: Some(weight_map),
            });
        }
        Err(LoadError::NoCheckpoint(dir.to_path_buf()))
    }

    /// Total bytes of the checkpoint's files.
    pub fn size_in_bytes(&self) -> u64 {
        self.files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Loads the tensors in `specs`, file by file. Each tensor's shape is checked before its bytes are read;
    /// tensors the model does not use (attention mask buffers of old checkpoints) are skipped.
    pub fn load(&self, specs: &[TensorSpec]) -> Result<HashMap<String, Tensor>, LoadError> {
        let wanted: HashMap<&str, &TensorSpec> = specs.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut out: HashMap<String, Tensor> = HashMap::with_capacity(specs.len());
        let files: Vec<&PathBuf> = match &self.weight_map {
            None => self.files.iter().collect(),
            Some(map) => {
                // Only the shards that hold something we need, each once, in index order.
                let needed: HashSet<&PathBuf> = specs.iter().filter_map(|s| map.get(&s.name)).collect();
                self.files.iter().filter(|f| needed.contains(f)).collect()
            }
        };
        for file in files {
            if !file.is_file() {
                return Err(LoadError::FileNotFound(file.clone()));
            }
            let mut put = |name: String, tensor: Tensor| {
                out.insert(name, tensor);
            };
            match self.format {
                Format::Safetensors => safetensors::load_file(file, &wanted, &mut put)?,
                Format::PytorchBin => pickle::load_file(file, &wanted, &mut put)?,
            }
        }
        if let Some(missing) = specs.iter().find(|s| !out.contains_key(&s.name)) {
            return Err(LoadError::MissingTensor {
                name: missing.name.clone(),
            });
        }
        Ok(out)
    }
}

/// Reads a `*.index.json`: `{"metadata": {...}, "weight_map": {"tensor": "shard file", ...}}`.
fn read_index(path: &Path, dir: &Path) -> Result<(Vec<PathBuf>, HashMap<String, PathBuf>), LoadError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
    let index: Index = serde_json::from_str(&text).map_err(|e| LoadError::BadIndex {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if index.weight_map.is_empty() {
        return Err(LoadError::BadIndex {
            path: path.to_path_buf(),
            message: "weight_map is empty".into(),
        });
    }
    let mut files: Vec<PathBuf> = Vec::new();
    let mut map = HashMap::with_capacity(index.weight_map.len());
    for (name, file) in index.weight_map {
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(LoadError::BadIndex {
                path: path.to_path_buf(),
                message: format!("shard name {file:?} is not a plain file name"),
            });
        }
        let file = dir.join(file);
        if !files.contains(&file) {
            files.push(file.clone());
        }
        map.insert(canonical_name(&name), file);
    }
    files.sort();
    Ok((files, map))
}
