//! Small tensors to and from host vectors: what the strategies read back from a step's logits and feed to
//! the next one.

use super::error::Result;
use std::cell::Cell;
use tch::{Device, Kind, Tensor};

thread_local! {
    /// Device→host readbacks made by decoding on this thread (the engine's): on a GPU each one waits for
    /// the device to finish the step's work, so the engine's benchmark reports how many a step makes.
    static READBACKS: Cell<u64> = const { Cell::new(0) };
}

/// The readbacks decoding has made so far on this thread.
pub fn readbacks() -> u64 {
    READBACKS.get()
}

fn count_readback() {
    READBACKS.set(READBACKS.get() + 1);
}

/// Copies a (small) tensor to the CPU as a flat vector.
pub(super) fn to_vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    count_readback();
    let flat = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_reshape([-1])?;
    Ok(Vec::<f32>::try_from(&flat)?)
}

pub(super) fn to_vec_i64(t: &Tensor) -> Result<Vec<i64>> {
    count_readback();
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
