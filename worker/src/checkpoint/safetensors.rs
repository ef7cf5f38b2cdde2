//! safetensors files: an 8-byte header length, a JSON header (name → dtype, shape, byte range), the data.
//!
//! Parsed here rather than with the `safetensors` crate because the crate wants the whole file as one byte
//! slice (a memory map), and we read each tensor with positioned reads instead (see `read`). Its header check
//! is also stricter than this reader: it refuses a file whose tensors leave unreferenced bytes between them.

use super::read::{TensorSpec, check_shape, read_placed};
use crate::load_error::LoadError;
use crate::weights::canonical_name;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use tch::{Kind, Tensor};

#[derive(serde::Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<i64>,
    data_offsets: (u64, u64),
}

fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "F64" => Kind::Double,
        _ => return None,
    })
}

pub(super) fn load_file(
    path: &Path,
    wanted: &HashMap<&str, &TensorSpec>,
    put: &mut dyn FnMut(String, Tensor),
) -> Result<(), LoadError> {
    let mut file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| LoadError::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| LoadError::bad_file(path, "shorter than a safetensors header"))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100 << 20 || 8 + header_len > file_len {
        return Err(LoadError::bad_file(
            path,
            format!("implausible header length {header_len}"),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| LoadError::io(path, e))?;
    let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| LoadError::bad_file(path, format!("header is not JSON: {e}")))?;
    let data_start = 8 + header_len;

    // Read in file order: sequential reads are the fastest on every kind of disk.
    let mut entries: Vec<(String, Entry)> = Vec::new();
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let name = canonical_name(&name);
        if !wanted.contains_key(name.as_str()) {
            continue;
        }
        let entry: Entry = serde_json::from_value(value)
            .map_err(|e| LoadError::bad_file(path, format!("header entry {name}: {e}")))?;
        entries.push((name, entry));
    }
    entries.sort_by_key(|(_, e)| e.data_offsets.0);

    for (name, entry) in entries {
        let spec = wanted[name.as_str()];
        check_shape(spec, &entry.shape)?;
        let kind = kind_of(&entry.dtype).ok_or_else(|| LoadError::UnsupportedTensorDtype {
            name: name.clone(),
            dtype: entry.dtype.clone(),
        })?;
        let (start, end) = entry.data_offsets;
        if end < start || data_start + end > file_len {
            return Err(LoadError::bad_file(
                path,
                format!("tensor {name} lies outside the file"),
            ));
        }
        file.seek(SeekFrom::Start(data_start + start))
            .map_err(|e| LoadError::io(path, e))?;
        let tensor = read_placed(&mut file, path, spec, kind, (end - start) as usize)?;
        put(name, tensor);
    }
    Ok(())
}
