//! Small tensors to and from host vectors: what the strategies read back from a step's logits and feed to
//! the next one.

use super::error::Result;
use tch::{Device, Kind, Tensor};

/// Copies a (small) tensor to the CPU as a flat vector.
pub(super) fn to_vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    let flat = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_reshape([-1])?;
    Ok(Vec::<f32>::try_from(&flat)?)
}

pub(super) fn to_vec_i64(t: &Tensor) -> Result<Vec<i64>> {
    let flat = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Int64)?
        .f_reshape([-1])?;
    Ok(Vec::<i64>::try_from(&flat)?)
}

/// An int64 tensor `[rows, cols]` from row-major values.
pub(super) fn i64_tensor(values: &[i64], rows: usize, cols: usize, device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(values)?
        .f_reshape([rows as i64, cols as i64])?
        .f_to_device(device)?)
}
