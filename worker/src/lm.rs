//! The seam between the model and the decoding strategies.
//!
//! Decoding strategies (greedy, contrastive, sampling, beam) only need "run these tokens, extend the cache,
//! give me logits (and hidden states)". Keeping that behind [`CausalLm`] lets each strategy be written and
//! tested once, whatever the model's placement over devices, and lets one loaded model serve many sequences:
//! the cache is an explicit value the caller owns.
//!
//! Two caches, for the two kinds of pass. A prompt's prefill runs alone into a [`KvCache`] that grows by
//! concatenation (it is written once). The running batch decodes into a [`SlotCache`]: fixed rows and
//! positions allocated ahead, each row a sequence (or a beam) whose new keys are written in place at its own
//! length, so a decode step copies only the new tokens' keys, never the cache.

use tch::{Device, Kind, Tensor};

/// What decoding needs to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
}

/// Per-layer key/value cache. Layer `i` holds `(key, value)`, each `[batch, n_head, seq, head_dim]`, on the
/// device that owns layer `i`.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        Self {
            layers: (0..n_layer).map(|_| None).collect(),
        }
    }

    /// Number of layers the cache has slots for.
    pub fn n_layer(&self) -> usize {
        self.layers.len()
    }

    /// Number of cached positions (0 before the first forward pass).
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.size()[2] as usize)
            .unwrap_or(0)
    }

    pub fn batch_size(&self) -> Option<usize> {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.size()[0] as usize)
    }

    pub fn layer(&self, i: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(i).and_then(|l| l.as_ref())
    }

    pub fn set_layer(&mut self, i: usize, key: Tensor, value: Tensor) {
        self.layers[i] = Some((key, value));
    }

    /// Keeps the batch rows `indices` (1-D int64, any device), in that order: beam reordering and picking
    /// the chosen candidate in contrastive search.
    pub fn select(&mut self, indices: &Tensor) {
        for (k, v) in self.layers.iter_mut().flatten() {
            let idx = indices.to_device(k.device());
            *k = k.index_select(0, &idx);
            *v = v.index_select(0, &idx);
        }
    }

    /// Repeats every batch row `n` times in place (row r becomes rows r*n .. r*n+n): expanding one sequence
    /// into its beams or contrastive candidates.
    pub fn repeat_interleave(&mut self, n: i64) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.repeat_interleave_self_int(n, 0, None);
            *v = v.repeat_interleave_self_int(n, 0, None);
        }
    }

    /// A deep copy (tensors are reference-counted; this copies their storage).
    pub fn deep_clone(&self) -> Self {
        Self {
            layers: self
                .layers
                .iter()
                .map(|l| l.as_ref().map(|(k, v)| (k.copy(), v.copy())))
                .collect(),
        }
    }
}

/// The running batch's KV cache, allocated ahead: row `r` holds its sequence's keys at positions `0..len_r`
/// with no padding (rows are ragged on the right); what lies past a row's length is scratch the attention
/// mask hides.
///
/// The layers that share a device (and dtype and shape) are stacked in one key tensor and one value tensor,
/// `[layers, rows, n_head, positions, head_dim]`, so moving a sequence's rows, reordering beams or keeping a
/// contrastive candidate is one copy per device and per key/value, never one per layer: a batch that
/// sequences join and leave every step pays O(1) operations per move, whatever the depth of the model. A
/// layer's keys are a view of its slice, so attention reads them in place.
///
/// Rows in use are always `0..n` (the scheduler fills the hole a leaver makes with the last rows), so a
/// decode step attends to a view of the first `n` rows and the first `max len` positions without copying.
#[derive(Debug)]
pub struct SlotCache {
    n_layer: usize,
    /// Copies made to keep the rows in order (joins, leaves, beam reorders, contrastive keeps): what the
    /// engine's benchmark reports as cache maintenance.
    copies: usize,
    /// Consecutive layers on one device, stacked; empty until the first `reserve`.
    groups: Vec<LayerGroup>,
    rows: usize,
    positions: usize,
}

/// Layers `first..first + count` of the model, on one device: `[count, rows, heads, positions, head_dim]`.
#[derive(Debug)]
struct LayerGroup {
    first: usize,
    count: usize,
    key: Tensor,
    value: Tensor,
}

impl LayerGroup {
    fn tensors(&self) -> [&Tensor; 2] {
        [&self.key, &self.value]
    }
}

impl SlotCache {
    pub fn new(n_layer: usize) -> Self {
        Self {
            n_layer,
            copies: 0,
            groups: Vec::new(),
            rows: 0,
            positions: 0,
        }
    }

    /// Rows allocated.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Positions allocated per row.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// KV positions allocated over the whole batch (rows × positions): what the batch budget counts.
    pub fn capacity(&self) -> usize {
        self.rows * self.positions
    }

    /// Tensor copies made so far to keep the rows in order (not counting a step's own key writes).
    pub fn copies(&self) -> usize {
        self.copies
    }

    /// Makes room for `rows` × `positions`, shaped like `like`'s layers (a prefill cache: dtype, device,
    /// heads and head size per layer). Growing copies the first `used_rows` rows' first `used_len`
    /// positions into the new allocation: a join's cost, never a step's.
    pub fn reserve(
        &mut self,
        rows: usize,
        positions: usize,
        used_rows: usize,
        used_len: usize,
        like: &KvCache,
    ) -> Result<(), tch::TchError> {
        if rows <= self.rows && positions <= self.positions {
            return Ok(());
        }
        let rows = rows.max(self.rows);
        let positions = positions.max(self.positions);
        // Group the layers by where and how they are stored.
        let mut shapes: Vec<(usize, usize, Kind, Device, i64, i64)> = Vec::new();
        for i in 0..self.n_layer {
            let (lk, _) = like
                .layer(i)
                .ok_or_else(|| tch::TchError::Shape(format!("the prefill cache has no layer {i}")))?;
            let size = lk.size();
            let sig = (lk.kind(), lk.device(), size[1], size[3]);
            match shapes.last_mut() {
                Some(g) if (g.2, g.3, g.4, g.5) == sig => g.1 += 1,
                _ => shapes.push((i, 1, sig.0, sig.1, sig.2, sig.3)),
            }
        }
        let mut groups = Vec::with_capacity(shapes.len());
        for (first, count, kind, device, heads, head_dim) in shapes {
            let shape = [count as i64, rows as i64, heads, positions as i64, head_dim];
            let group = LayerGroup {
                first,
                count,
                key: Tensor::f_zeros(shape, (kind, device))?,
                value: Tensor::f_zeros(shape, (kind, device))?,
            };
            if used_rows > 0 && used_len > 0 {
                let old = self
                    .groups
                    .iter()
                    .find(|o| o.first == first && o.count == count)
                    .ok_or_else(|| tch::TchError::Shape("the model's layers changed devices".into()))?;
                let (r, l) = (used_rows as i64, used_len as i64);
                for (new, old) in group.tensors().into_iter().zip(old.tensors()) {
                    new.f_narrow(1, 0, r)?
                        .f_narrow(3, 0, l)?
                        .f_copy_(&old.f_narrow(1, 0, r)?.f_narrow(3, 0, l)?)?;
                }
            }
            groups.push(group);
        }
        if used_rows > 0 && used_len > 0 {
            self.copies += 2 * groups.len();
        }
        self.groups = groups;
        self.rows = rows;
        self.positions = positions;
        Ok(())
    }

    /// Frees the allocation (the batch is empty).
    pub fn release(&mut self) {
        self.groups.clear();
        self.rows = 0;
        self.positions = 0;
    }

    /// Writes row `from_row` of a prefill cache, its positions `start..start + len` (past its left padding),
    /// into positions `0..len` of rows `row..row + copies`: one stack and one copy per device and key/value.
    pub fn load(
        &mut self,
        row: usize,
        copies: usize,
        from: &KvCache,
        from_row: usize,
        start: usize,
        len: usize,
    ) -> Result<(), tch::TchError> {
        let (l, c) = (len as i64, copies as i64);
        self.copies += 2 * self.groups.len();
        for g in self.allocated()? {
            for (which, dst) in g.tensors().into_iter().enumerate() {
                let mut parts = Vec::with_capacity(g.count);
                for i in g.first..g.first + g.count {
                    let (k, v) = from
                        .layer(i)
                        .ok_or_else(|| tch::TchError::Shape(format!("the prefill cache has no layer {i}")))?;
                    let t = if which == 0 { k } else { v };
                    parts.push(t.f_narrow(0, from_row as i64, 1)?.f_narrow(2, start as i64, l)?);
                }
                // [count, 1, heads, len, head_dim], broadcast over the copies.
                let stacked = Tensor::f_stack(&parts, 0)?.f_to_kind(dst.kind())?;
                let size = stacked.size();
                dst.f_narrow(1, row as i64, c)?
                    .f_narrow(3, 0, l)?
                    .f_copy_(&stacked.f_expand([size[0], c, size[2], size[3], size[4]], false)?)?;
            }
        }
        Ok(())
    }

    /// Moves rows `from..from + n` to `to..to + n` (their first `len` positions): filling the hole a
    /// sequence left with the batch's last rows, or packing.
    pub fn move_rows(&mut self, from: usize, to: usize, n: usize, len: usize) -> Result<(), tch::TchError> {
        if n == 0 || len == 0 || from == to {
            return Ok(());
        }
        let (f, t, n, l) = (from as i64, to as i64, n as i64, len as i64);
        let overlap = from.abs_diff(to) < n as usize;
        self.copies += 2 * self.groups.len();
        for g in self.allocated()? {
            for x in g.tensors() {
                let src = x.f_narrow(1, f, n)?.f_narrow(3, 0, l)?;
                // Overlapping ranges go through a copy, never an aliased in-place copy.
                let src = if overlap { src.f_detach_copy()? } else { src };
                x.f_narrow(1, t, n)?.f_narrow(3, 0, l)?.f_copy_(&src)?;
            }
        }
        Ok(())
    }

    /// Rows `row..row + n`, their first `len` positions, copied out as a cache of their own (`[n, heads,
    /// len, head_dim]` a layer, on each layer's device): a paused sequence's keys, which [`SlotCache::load`]
    /// puts back into any free rows. One copy per layer and key/value.
    pub fn save_rows(&mut self, row: usize, n: usize, len: usize) -> Result<KvCache, tch::TchError> {
        let mut out = KvCache::new(self.n_layer);
        self.copies += 2 * self.n_layer;
        for g in self.allocated()? {
            for i in 0..g.count {
                // A copy, never a view: the rows are reused once the sequence is out.
                let [k, v] = g.tensors().map(|x| {
                    x.f_select(0, i as i64)?
                        .f_narrow(0, row as i64, n as i64)?
                        .f_narrow(2, 0, len as i64)?
                        .f_detach_copy()
                });
                out.set_layer(g.first + i, k?, v?);
            }
        }
        Ok(out)
    }

    /// Rows `row0..row0 + sources.len()` become copies of rows `row0 + sources[j]` (first `len` positions):
    /// beam search keeping the continuations of its best beams. One gather and one copy per device.
    pub fn reorder(&mut self, row0: usize, sources: &[i64], len: usize) -> Result<(), tch::TchError> {
        if sources.iter().enumerate().all(|(j, &s)| s == j as i64) || len == 0 {
            return Ok(());
        }
        let (r, n, l) = (row0 as i64, sources.len() as i64, len as i64);
        let host = Tensor::f_from_slice(sources)?;
        self.copies += 2 * self.groups.len();
        for g in self.allocated()? {
            let idx = host.f_to_device(g.key.device())?;
            for x in g.tensors() {
                let mut group = x.f_narrow(1, r, n)?.f_narrow(3, 0, l)?;
                let picked = group.f_index_select(1, &idx)?;
                group.f_copy_(&picked)?;
            }
        }
        Ok(())
    }

    /// Copies position `from` of row `row` to position `to`: contrastive search keeping the candidate it
    /// chose (the candidates' keys were written side by side past the sequence's end). One copy per device.
    pub fn move_position(&mut self, row: usize, from: usize, to: usize) -> Result<(), tch::TchError> {
        if from == to {
            return Ok(());
        }
        self.copies += 2 * self.groups.len();
        for g in self.allocated()? {
            for x in g.tensors() {
                let at = x.f_select(1, row as i64)?;
                // Two distinct positions: the source and the destination never overlap.
                let src = at.f_narrow(2, from as i64, 1)?;
                at.f_narrow(2, to as i64, 1)?.f_copy_(&src)?;
            }
        }
        Ok(())
    }

    /// For each `(row, from, to)`, copies position `from` of `row` to position `to`: every contrastive
    /// sequence of a step keeping the candidate it chose, in one gather and one scatter per device.
    pub fn keep_positions(&mut self, moves: &[(usize, usize, usize)]) -> Result<(), tch::TchError> {
        let moves: Vec<_> = moves.iter().filter(|(_, from, to)| from != to).collect();
        if moves.is_empty() {
            return Ok(());
        }
        let column = |f: fn(&(usize, usize, usize)) -> usize| -> Result<Tensor, tch::TchError> {
            Tensor::f_from_slice(&moves.iter().map(|m| f(m) as i64).collect::<Vec<_>>())
        };
        let (rows, from, to) = (column(|m| m.0)?, column(|m| m.1)?, column(|m| m.2)?);
        self.copies += 2 * self.groups.len();
        for g in self.allocated()? {
            let device = g.key.device();
            let (rows, from, to) = (
                rows.f_to_device(device)?,
                from.f_to_device(device)?,
                to.f_to_device(device)?,
            );
            for x in g.tensors() {
                // `[c, layers, heads, head_dim]`: each move's key, every layer at once.
                let kept = x.f_index(&[None, Some(&rows), None, Some(&from)])?;
                let mut x = x.shallow_clone();
                let _ = x.f_index_put_(&[None, Some(&rows), None, Some(&to)], &kept, false)?;
            }
        }
        Ok(())
    }

    /// Layers the cache has slots for.
    pub fn layer_count(&self) -> usize {
        self.n_layer
    }

    /// Layer `i`'s tensors, `[rows, heads, positions, head_dim]` each: views of its group's.
    pub fn layer(&self, i: usize) -> Result<(Tensor, Tensor), tch::TchError> {
        let g = self
            .groups
            .iter()
            .find(|g| (g.first..g.first + g.count).contains(&i))
            .ok_or_else(|| tch::TchError::Shape(format!("no layer {i} in the slot cache")))?;
        let at = (i - g.first) as i64;
        Ok((g.key.f_select(0, at)?, g.value.f_select(0, at)?))
    }

    fn allocated(&self) -> Result<&[LayerGroup], tch::TchError> {
        if self.groups.is_empty() {
            return Err(tch::TchError::Shape("the slot cache is not allocated".into()));
        }
        Ok(&self.groups)
    }

    /// Where a step's new keys go in a layer's flattened cache (`[rows * heads * positions, head_dim]`):
    /// row `r`'s new token `j`, head `h`, at `(r * heads + h) * positions + starts[r] + j`, in the order of
    /// the step's new keys, `[tokens, heads, head_dim]`: every place of the `[S, Q]` grid, or a packed
    /// step's real tokens. The same for every layer (they share heads and positions), so a step builds it
    /// once per device.
    pub fn write_index(
        &self,
        heads: i64,
        step: &SlotStep,
        device: tch::Device,
    ) -> Result<Tensor, tch::TchError> {
        let positions = self.positions as i64;
        let q = step.queries();
        let places: Vec<usize> = match &step.packed {
            None => (0..step.starts.len() * q).collect(),
            Some(p) => p.tokens.iter().map(|&g| g as usize).collect(),
        };
        let mut index = Vec::with_capacity(places.len() * heads as usize);
        for g in places {
            let (r, j) = (g / q, g % q);
            let at = step.starts[r] as i64 + j as i64;
            index.extend((0..heads).map(|head| (r as i64 * heads + head) * positions + at));
        }
        Tensor::f_from_slice(&index)?.f_to_device(device)
    }

    /// Writes a step's new keys and values of layer `i` in place, where `index` ([`SlotCache::write_index`],
    /// on the layer's device) says: `[S, Q, H, D]` for a grid step, `[1, T, H, D]` for a packed one (each
    /// flattens to the index's order).
    pub fn write(&mut self, i: usize, k: &Tensor, v: &Tensor, index: &Tensor) -> Result<(), tch::TchError> {
        let positions = self.positions as i64;
        let (ck, cv) = self.layer(i)?;
        let [rows, h, _, d] = ck.size()[..] else {
            return Err(tch::TchError::Shape(format!(
                "a cache layer of shape {:?}",
                ck.size()
            )));
        };
        if k.size().last() != Some(&d) || k.numel() as i64 != index.numel() as i64 * d {
            return Err(tch::TchError::Shape(format!(
                "new keys of shape {:?} for a write index of {}",
                k.size(),
                index.numel()
            )));
        }
        for (cache, new) in [(ck, k), (cv, v)] {
            // A layer's slice of its contiguous group is contiguous: this view aliases the cache.
            let mut flat = cache.f_view([rows * h * positions, d])?;
            let _ = flat.f_index_copy_(0, index, &new.f_reshape([-1, d])?.f_to_kind(cache.kind())?)?;
        }
        Ok(())
    }

    /// Layer `i`'s keys and values for rows `0..rows`, positions `0..keys`: views, no copy.
    pub fn view(&self, i: usize, rows: usize, keys: usize) -> Result<(Tensor, Tensor), tch::TchError> {
        let (k, v) = self.layer(i)?;
        let (r, l) = (rows as i64, keys as i64);
        Ok((
            k.f_narrow(0, 0, r)?.f_narrow(2, 0, l)?,
            v.f_narrow(0, 0, r)?.f_narrow(2, 0, l)?,
        ))
    }
}

/// One decode step of the running batch: rows `0..S` of a [`SlotCache`], up to `Q` new tokens per row.
///
/// Rows feed one token each, except a contrastive search row, which feeds its `top_k` candidates. When rows
/// feed different numbers of tokens the step is packed: only the `T` real tokens go through the model's
/// projections and MLP, and attention alone sees them laid out on the `[S, Q]` grid. One contrastive
/// sequence in a batch of a hundred greedy ones then costs its own `top_k` tokens, not `top_k` for every row.
#[derive(Debug)]
pub struct SlotStep {
    /// `[S, Q]` int64; packed, `[1, T]`: the real tokens in grid order.
    pub ids: Tensor,
    /// Each new token's position in its own sequence, shaped as `ids`.
    pub positions: Tensor,
    /// Where row `r`'s new keys are written: positions `starts[r]..starts[r] + Q`.
    pub starts: Vec<usize>,
    /// `[S, Q, K]` bool: which of the first `K = max(starts) + Q` positions each grid query sees; `None`
    /// when every query sees all `K` (one row, one token).
    pub visible: Option<Tensor>,
    /// The grid of a packed step; `None` when every grid place is a real token.
    pub packed: Option<Packed>,
}

/// Where a packed step's real tokens lie on its `[S, Q]` grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// The grid's width `Q`.
    pub queries: usize,
    /// Each real token's place `r * Q + j` on the grid, in order.
    pub tokens: Vec<i64>,
    /// Each grid place's real token (an index into `tokens`); a padding place takes its row's first token,
    /// so its query stays finite, and nothing reads its output.
    pub grid: Vec<i64>,
}

impl Packed {
    /// The packing of rows feeding `queries[r]` tokens each, or `None` when they all feed the same number.
    pub fn of(queries: &[usize]) -> Option<Packed> {
        let q = queries.iter().copied().max().unwrap_or(1);
        if queries.iter().all(|&n| n == q) {
            return None;
        }
        let mut tokens = Vec::with_capacity(queries.iter().sum());
        let mut grid = Vec::with_capacity(queries.len() * q);
        for (r, &n) in queries.iter().enumerate() {
            let first = tokens.len() as i64;
            tokens.extend((0..n).map(|j| (r * q + j) as i64));
            grid.extend((0..q).map(|j| if j < n { first + j as i64 } else { first }));
        }
        Some(Packed {
            queries: q,
            tokens,
            grid,
        })
    }
}

impl SlotStep {
    /// Grid width `Q`: the most tokens a row feeds.
    pub fn queries(&self) -> usize {
        match &self.packed {
            Some(p) => p.queries,
            None => self.ids.size().get(1).copied().unwrap_or(1) as usize,
        }
    }

    /// Positions the step's attention covers.
    pub fn keys(&self) -> usize {
        self.starts.iter().copied().max().unwrap_or(0) + self.queries()
    }

    /// Where row `r`'s query `j` lies in the pass's outputs (`[S * Q]` flattened, or `[T]` packed).
    pub fn output_index(&self, r: usize, j: usize) -> usize {
        let q = self.queries();
        match &self.packed {
            None => r * q + j,
            Some(p) => p.grid[r * q + j] as usize,
        }
    }
}

/// Output of one forward pass.
#[derive(Debug)]
pub struct StepOutput {
    /// `[batch, seq, vocab]` float32 (`seq` is 1 when only the last position was asked for), on
    /// [`CausalLm::output_device`].
    pub logits: Tensor,
    /// Final hidden states after the last LayerNorm, `[batch, seq, n_embd]` float32, when asked for.
    pub hidden: Option<Tensor>,
}

/// Which positions' logits a forward pass computes. The prefill of a long prompt only needs the last one;
/// computing the head for every position would cost `seq × vocab × n_embd` for nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    LastOnly,
    All,
    /// No head at all: the caller wants hidden states and computes logits for the rows it keeps with
    /// [`CausalLm::head`] (contrastive search keeps one of its `top_k` candidates).
    None,
}

/// A causal language model with a KV cache.
pub trait CausalLm {
    fn info(&self) -> &ModelInfo;

    /// Device where logits and hidden states come out (the head's device).
    fn output_device(&self) -> Device;

    /// Runs `input_ids` (`[batch, seq]` int64) after what `cache` holds and appends to the cache.
    ///
    /// `attention_mask` is `[batch, cache.seq_len() + seq]` int64, 1 for real tokens and 0 for left padding;
    /// `position_ids` is `[batch, seq]` int64. Inputs may be on any device; the model moves them.
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
        logits: Logits,
        output_hidden: bool,
    ) -> Result<StepOutput, tch::TchError>;

    /// Runs one decode step of the running batch over `cache`'s rows `0..S`, writing the new keys in place.
    /// Logits and hidden states come out for every new token (`[S, Q, ·]`), or no logits for
    /// [`Logits::None`].
    fn forward_slots(
        &self,
        step: &SlotStep,
        cache: &mut SlotCache,
        logits: Logits,
        output_hidden: bool,
    ) -> Result<StepOutput, tch::TchError>;

    /// Whether [`CausalLm::head`] works, so `forward` may be asked for [`Logits::None`].
    fn separate_head(&self) -> bool {
        false
    }

    /// Logits `[rows, vocab]` float32 from final hidden states `[rows, n_embd]` as `forward` returns them.
    /// Models without a separate head never get this call (see [`CausalLm::separate_head`]).
    fn head(&self, hidden: &Tensor) -> Result<Tensor, tch::TchError> {
        let _ = hidden;
        Err(tch::TchError::Kind("this model has no separate head".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_feeding_as_many_tokens_as_each_other_are_not_packed() {
        assert_eq!(Packed::of(&[1, 1, 1]), None);
        assert_eq!(Packed::of(&[4, 4]), None);
    }

    #[test]
    fn a_packed_step_lays_its_real_tokens_on_the_grid_and_pads_with_each_rows_first() {
        // Rows feeding 1, 3 and 1 tokens: a grid 3 wide, 5 real tokens.
        let p = Packed::of(&[1, 3, 1]).expect("packed");
        assert_eq!(p.queries, 3);
        assert_eq!(p.tokens, vec![0, 3, 4, 5, 6]);
        assert_eq!(p.grid, vec![0, 0, 0, 1, 2, 3, 4, 4, 4]);
        // Every real token's grid place maps back to it.
        for (t, &g) in p.tokens.iter().enumerate() {
            assert_eq!(p.grid[g as usize], t as i64);
        }
    }

    #[test]
    fn the_write_index_of_a_packed_step_covers_its_real_tokens_only() {
        let mut cache = SlotCache::new(1);
        let mut like = KvCache::new(1);
        let k = Tensor::zeros([1, 2, 1, 3], (Kind::Float, Device::Cpu));
        like.set_layer(0, k.shallow_clone(), k);
        cache.reserve(3, 10, 0, 0, &like).expect("reserved");
        let packed = Packed::of(&[1, 3, 1]).expect("packed");
        let step = SlotStep {
            ids: Tensor::zeros([1, 5], (Kind::Int64, Device::Cpu)),
            positions: Tensor::zeros([1, 5], (Kind::Int64, Device::Cpu)),
            starts: vec![2, 5, 7],
            visible: None,
            packed: Some(packed),
        };
        let index: Vec<i64> =
            Vec::try_from(cache.write_index(2, &step, Device::Cpu).expect("index")).expect("ints");
        // (row * heads + head) * positions + start + j, token by token, head by head.
        assert_eq!(index, vec![2, 12, 25, 35, 26, 36, 27, 37, 47, 57]);
    }
}
