//! One stored tensor into a new tensor with the shape, dtype and device the model asks for: the last step
//! of both formats' readers, and the loader's one unsafe block.

use crate::load_error::LoadError;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A tensor the model wants: its shape, and where and in which dtype it should end up.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub device: Device,
    pub kind: Kind,
}

/// Checks a stored tensor against its spec (shape first, so a wrong config is named before any byte moves).
pub(super) fn check_shape(spec: &TensorSpec, found: &[i64]) -> Result<(), LoadError> {
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
pub(super) fn place(tensor: Tensor, spec: &TensorSpec) -> Result<Tensor, LoadError> {
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
pub(super) fn read_placed(
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
pub(super) fn fill(
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
