//! Reading Hugging Face checkpoints: `model.safetensors`, `pytorch_model.bin`, and the sharded layouts with
//! their `*.index.json`, as published for GPT-J.
//!
//! The loader goes shard by shard and puts each tensor straight onto the device that owns it, converted to
//! the dtype asked for, so host memory peaks near what the CPU keeps plus one tensor in flight: tensors are
//! read with positioned reads into freshly allocated tensors (no memory map whose touched pages would count
//! as resident, no intermediate byte buffer).

mod pickle;
mod safetensors;

use crate::model::LoadError;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

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

/// A tensor the model wants: its shape, and where and in which dtype it should end up.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub device: Device,
    pub kind: Kind,
}

/// Older checkpoints (saved from `GPTJModel`, or by the original GPT-J conversion scripts) name the
/// transformer's tensors without the `transformer.` prefix.
pub fn canonical_name(name: &str) -> String {
    if ["h.", "wte.", "ln_f."].iter().any(|p| name.starts_with(p)) {
        format!("transformer.{name}")
    } else {
        name.to_string()
    }
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

/// Checks a stored tensor against its spec (shape first, so a wrong config is named before any byte moves).
fn check_shape(spec: &TensorSpec, found: &[i64]) -> Result<(), LoadError> {
    if spec.shape != found {
        return Err(LoadError::ShapeMismatch {
            name: spec.name.clone(),
            expected: spec.shape.clone(),
            found: found.to_vec(),
        });
    }
    Ok(())
}

/// Moves a tensor read whole onto the CPU (a `.bin` storage shared by several tensors) to its device and
/// dtype. On a GPU the conversion runs there.
fn place(tensor: Tensor, spec: &TensorSpec) -> Result<Tensor, LoadError> {
    let t = if spec.device == Device::Cpu {
        if tensor.kind() == spec.kind {
            tensor
        } else {
            tensor.f_to_kind(spec.kind)?
        }
    } else {
        let t = tensor.f_to_device(spec.device)?;
        if t.kind() == spec.kind {
            t
        } else {
            t.f_to_kind(spec.kind)?
        }
    };
    Ok(t)
}

/// Elements converted or copied to a device per step: 16 MB of float32 on the host at a time.
const STAGING_ELEMENTS: i64 = 4 << 20;

/// Reads a tensor stored as `stored` (`nbytes` from `reader`) into a new tensor with `spec`'s shape, dtype
/// and device.
///
/// Stored as wanted and kept on the CPU, the bytes go straight into the tensor. Otherwise the tensor is
/// allocated where it belongs and filled through a small host staging buffer, converting as it goes, so
/// host memory never holds a second full copy (GPT-J-6B's embedding is 800 MB in float32).
fn read_placed(
    reader: &mut dyn std::io::Read,
    path: &Path,
    spec: &TensorSpec,
    stored: Kind,
    nbytes: usize,
) -> Result<Tensor, LoadError> {
    let numel: i64 = spec.shape.iter().product();
    let expected = numel as usize * stored.elt_size_in_bytes();
    if expected != nbytes {
        return Err(LoadError::bad_file(
            path,
            format!(
                "tensor {} of shape {:?} needs {expected} bytes, the file gives {nbytes}",
                spec.name, spec.shape
            ),
        ));
    }
    if spec.device == Device::Cpu && spec.kind == stored {
        let tensor = Tensor::f_empty(spec.shape.as_slice(), (stored, Device::Cpu))?;
        fill(reader, path, &tensor, nbytes)?;
        return Ok(tensor);
    }
    let dst = Tensor::f_empty(spec.shape.as_slice(), (spec.kind, spec.device))?;
    let flat = dst.f_view([-1])?;
    let chunk = numel.min(STAGING_ELEMENTS);
    let staging = Tensor::f_empty([chunk.max(1)], (stored, Device::Cpu))?;
    let mut done = 0;
    while done < numel {
        let n = chunk.min(numel - done);
        fill(reader, path, &staging, n as usize * stored.elt_size_in_bytes())?;
        flat.f_narrow(0, done, n)?.f_copy_(&staging.f_narrow(0, 0, n)?)?;
        done += n;
    }
    Ok(dst)
}

/// Reads exactly `nbytes` from `reader` into the start of `tensor`'s storage.
///
/// This is the loader's one unsafe block. Reading straight into a tensor's storage is what keeps peak host
/// memory at one copy of the weights: `Tensor::from_data_size` needs the bytes in a buffer first (a second
/// copy), and a memory map leaves every touched page of the file resident until it is dropped.
#[allow(unsafe_code)]
fn fill(
    reader: &mut dyn std::io::Read,
    path: &Path,
    tensor: &Tensor,
    nbytes: usize,
) -> Result<(), LoadError> {
    let capacity = tensor.numel() * tensor.kind().elt_size_in_bytes();
    if tensor.device() != Device::Cpu || !tensor.is_contiguous() || nbytes > capacity {
        return Err(LoadError::bad_file(
            path,
            "internal: read target is not a large enough CPU tensor",
        ));
    }
    if nbytes == 0 {
        return Ok(());
    }
    // SAFETY: `tensor` is a contiguous CPU tensor that this module allocated with `Tensor::f_empty` and
    // has not shared, so its storage holds at least `capacity >= nbytes` bytes starting at `data_ptr`, and
    // nothing else reads or writes it while `buf` lives; `buf` does not outlive this call, during which
    // `tensor` is borrowed and so alive. Any byte pattern is a valid value of the float kinds read here.
    let buf: &mut [u8] = unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut u8, nbytes) };
    reader
        .read_exact(buf)
        .map_err(|e| LoadError::bad_file(path, format!("reading tensor data: {e}")))
}
