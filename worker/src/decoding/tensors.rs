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

/// Width of the blocks [`top_k`] splits a row into on the CPU.
const BLOCK: i64 = 32;

/// The `k` largest values of each row of a `[rows, n]` float tensor and their indices, largest first, as
/// `Tensor::topk` gives them. On the CPU, where libtorch's top-k copies every row into (value, index) pairs
/// and sorts part of them (1.7 ms for `[32, 50,400]` on one thread, against 0.4 ms this way): the `k` largest
/// values lie in the `k` blocks of 32 whose maxima are largest, so a top-k of the block maxima picks the
/// blocks, and a top-k of their `32 k` values the answer. Among equal values the indices may differ from
/// `topk`'s.
pub(super) fn top_k(t: &Tensor, k: i64) -> Result<(Tensor, Tensor)> {
    let size = t.size();
    let (rows, n) = (size[0], size[1]);
    if t.device() != Device::Cpu || n % BLOCK != 0 || k * BLOCK >= n {
        return Ok(t.f_topk(k, -1, true, true)?);
    }
    let blocks = t.f_view([rows, n / BLOCK, BLOCK])?;
    let (_, chosen) = blocks
        .f_amax([-1i64].as_slice(), false)?
        .f_topk(k, -1, true, false)?;
    let candidates = blocks
        .f_gather(
            1,
            &chosen.f_unsqueeze(-1)?.f_expand([rows, k, BLOCK], false)?,
            false,
        )?
        .f_view([rows, k * BLOCK])?;
    let (values, at) = candidates.f_topk(k, -1, true, true)?;
    let block = chosen.f_gather(1, &at.f_floor_divide_scalar(BLOCK)?, false)?;
    let indices = block.f_mul_scalar(BLOCK)?.f_add(&at.f_remainder(BLOCK)?)?;
    Ok((values, indices))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_by_blocks_gives_what_topk_gives() {
        tch::manual_seed(7);
        for (rows, n, k) in [
            (3, 64 * 32, 5),
            (1, 50_400, 20),
            (4, 96, 2),
            (2, 100, 5),
            (2, 64, 2),
        ] {
            let t = Tensor::randn([rows, n], (Kind::Float, Device::Cpu));
            let (values, indices) = top_k(&t, k).unwrap();
            let (want_values, want_indices) = t.topk(k, -1, true, true);
            assert!(values.equal(&want_values), "values, {rows}×{n}, k {k}");
            assert!(indices.equal(&want_indices), "indices, {rows}×{n}, k {k}");
        }
    }

    #[test]
    fn top_k_by_blocks_keeps_values_that_share_a_block() {
        // The three largest values sit in one block: the other blocks chosen hold none of them.
        let mut row = vec![0.0f32; 32 * 8];
        for (i, v) in [(40, 9.0), (41, 8.0), (45, 7.0), (200, 6.0)] {
            row[i] = v;
        }
        let t = Tensor::from_slice(&row).view([1, -1]);
        let (values, indices) = top_k(&t, 4).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(values.view([-1])).unwrap(),
            vec![9.0, 8.0, 7.0, 6.0]
        );
        assert_eq!(
            Vec::<i64>::try_from(indices.view([-1])).unwrap(),
            vec![40, 41, 45, 200]
        );
    }
}
